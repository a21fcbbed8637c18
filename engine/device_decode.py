"""Decoding JPEGs on the encoder's device: torchvision's decoder (nvJPEG on CUDA, libjpeg-turbo on the CPU), then
orientation, crop and resize there, to the geometry of the host path (engine.images.read_image).

The host only reads each file's bytes and its header (`read_jpeg`); `decode_fitted` decodes a batch of them in one
call and fits each image like `read_image` does: EXIF orientation, the query's box, `fit_size`, bilinear with
antialiasing (Pillow's BILINEAR filter when shrinking), rounded to uint8. Anything the host decodes differently
or that is not a plain JPEG (other formats, CMYK or Adobe-RGB JPEGs, a file that does not end where a JPEG ends,
a header over MAX_PIXELS) is left to the host path, as is any JPEG the device's decoder refuses: the host then
decodes it, or names the problem exactly as it would have alone.

Same pixels as the host? On the CPU, libjpeg-turbo decodes what Pillow decodes bit for bit and only the resize
differs (float weights against Pillow's fixed point): by one level, in under 1% of the pixels. nvJPEG upsamples chroma by
nearest neighbour where libjpeg interpolates, so CUDA pixels differ a little more at colour edges
(tests/test_device_decode.py states the tolerances).
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import EngineError
from .images import MAX_PIXELS, crop_box, fit_size

# EXIF orientation -> the transposition ImageOps.exif_transpose applies, on a C x H x W tensor (1 and any other
# value: as stored). Pillow's ROTATE_90 turns counter-clockwise, as torch.rot90 does from H towards W.
ORIENTATIONS = {
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270
    7: lambda x: x.flip(-2, -1).transpose(-2, -1),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90
}


@dataclass(frozen=True)
class Jpeg:
    """A JPEG file's bytes waiting for the device: `data` 1-d uint8 (CPU), `orientation` its EXIF orientation."""

    data: torch.Tensor
    orientation: int


def read_jpeg(path: str | Path) -> Jpeg | None:
    """The file as a `Jpeg` when the device decodes it as the host would; None: leave it to the host path.

    That is an 8-bit greyscale or YCbCr JPEG (baseline or progressive) that ends with its end-of-image marker (a
    truncated file is the host's to refuse) and whose header claims at most MAX_PIXELS pixels; only the header
    is parsed here. Never raises for the file's sake: an unreadable or odd file is the host's to name.
    """
    try:
        with open(path, "rb") as f:
            raw = bytearray(f.read(2))  # writable: torch.frombuffer takes it as it is, no copy
            if raw != b"\xff\xd8":  # not a JPEG: read once, by the host path, not twice
                return None
            raw += f.read()
    except OSError:
        return None
    if raw[-2:] != b"\xff\xd9":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: MAX_PIXELS decides, below
            with Image.open(io.BytesIO(raw)) as img:
                plain = img.format == "JPEG" and (
                    img.mode == "L" or (img.mode == "RGB" and img.info.get("adobe_transform", 1) == 1))
                if not plain or img.width * img.height > MAX_PIXELS:
                    return None
                orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    except Exception:  # Pillow raises many types for a bad header
        return None
    return Jpeg(torch.frombuffer(raw, dtype=torch.uint8), orientation)


def decode_jpegs(jpegs: Sequence[Jpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG as a 3 x H x W uint8 tensor on `device`, as stored (not yet oriented); None where the decoder
    refused it. One batched call; if it fails, one call per image, so one bad file costs only itself."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [j.data for j in jpegs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out


def fit(image: torch.Tensor, orientation: int, max_side: int, bbx: Sequence[float] | None, path) -> torch.Tensor:
    """A decoded 3 x H x W uint8 image -> H' x W' x 3 uint8 on its device, as `read_image` shapes it: oriented,
    cropped to `bbx`, resized by `fit_size` (bilinear, antialiased when shrinking, rounded). An empty box is an
    EngineError naming `path`."""
    x = ORIENTATIONS.get(orientation, lambda x: x)(image)
    if bbx is not None:
        x1, y1, x2, y2 = crop_box(bbx, x.shape[-1], x.shape[-2], path)
        x = x[:, y1:y2, x1:x2]
    w, h = fit_size(x.shape[-1], x.shape[-2], max_side)
    if w != x.shape[-1]:
        x = _resample(x, x.shape[-2], w)
    if h != x.shape[-2]:
        x = _resample(x, h, w)
    return x.permute(1, 2, 0)


def _resample(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One pass of Pillow's BILINEAR resize (uint8 C x H x W -> C x h x w, one of h, w as it is): the triangle
    filter widened by the scale when shrinking (torch's antialias follows Pillow's), rounded to uint8 after each
    pass as Pillow does (horizontal first), which keeps the result within a level of Pillow's."""
    y = torch.nn.functional.interpolate(x[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y[0].add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # halves up, as Pillow rounds


def decode_fitted(jpegs: Sequence[Jpeg], boxes: Sequence[Sequence[float] | None], paths: Sequence, max_side: int,
                  device: torch.device) -> list[tuple[torch.Tensor | None, str | None] | None]:
    """Decode `jpegs` on `device` and fit each (`fit`): per JPEG (H x W x 3 uint8 on `device`, None) or (None,
    error) for an empty box, or None where the decoder refused it (for the host path to decode or name)."""
    out = []
    for jpeg, image, bbx, path in zip(jpegs, decode_jpegs(jpegs, device), boxes, paths):
        if image is None:
            out.append(None)
            continue
        try:
            out.append((fit(image, jpeg.orientation, max_side, bbx, path), None))
        except EngineError as e:
            out.append((None, str(e)))
    return out
