"""Reading images: the one decoder of the engine (encoders, report thumbnails, views photographs), then crop and resize.

Every failure names the file.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import EngineError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MIN_SIDE = 32  # the trunks' stride: a smaller input leaves no feature map to pool
DEFAULT_MAX_SIDE = 362
# Decompression-bomb guard: an image whose header claims more pixels is refused before any pixel is decoded.
# 100 MP (e.g. 12000 x 8000, 300 MB as RGB) is above any camera photograph the benchmarks hold.
MAX_PIXELS = 100_000_000
BACKGROUND = (255, 255, 255)  # what transparent pixels show: the image as it looks on a white page
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit integer and float grayscale


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, one defined way.

    16/32-bit and float grayscale: scaled so the image's maximum is 255 (the range a 12- or 16-bit sensor
    used, not the type's). Transparency (an alpha band, a palette or RGB with a transparent colour):
    composited on BACKGROUND (white). Grayscale, palette, CMYK, YCbCr, 1-bit: Pillow's conversion to RGB.
    """
    if img.mode in _DEEP_MODES:
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        hi = a.max() if a.size and a.max() > 0 else 1.0
        img = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8))
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new("RGBA", img.size, (*BACKGROUND, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image, EXIF orientation applied, modes converted by `_to_rgb`.

    Raises EngineError naming the file when it is missing, when its header claims more than MAX_PIXELS
    pixels (checked before decoding: a decompression bomb costs nothing), or when it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError("image not found", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, below
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise EngineError(f"image header claims {img.width}x{img.height} pixels, over the {MAX_PIXELS} "
                                      f"pixel limit (not decoded)", path)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except EngineError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own, stricter-than-ours check fired first in Image.open
        raise EngineError(f"image header claims too many pixels, over the {MAX_PIXELS} pixel limit (not decoded: {e})"
                          .splitlines()[0], path) from None
    except Exception as e:  # PIL raises many types for a bad file
        raise EngineError(f"cannot decode image ({type(e).__name__}: {e})".splitlines()[0], path) from None


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size after scaling down so the longer side is at most `max_side`, and up so the shorter is at least MIN_SIDE."""
    scale = min(1.0, max_side / max(width, height))
    scale = max(scale, MIN_SIDE / min(width, height))
    return max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))


def crop_box(bbx: Sequence[float], width: int, height: int, path) -> tuple[int, int, int, int]:
    """A box (x1, y1, x2, y2) clipped to a width x height image, in whole pixels: what `read_image` crops.

    A box with less than a pixel inside the image is an EngineError naming `path`.
    """
    x1, y1, x2, y2 = (float(v) for v in bbx)
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(width), x2), min(float(height), y2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise EngineError(f"bounding box {list(bbx)} is empty inside the {width}x{height} image", path)
    return round(x1), round(y1), round(x2), round(y2)


def read_image(path: str | Path, max_side: int = DEFAULT_MAX_SIDE, bbx: Sequence[float] | None = None) -> np.ndarray:
    """An image as an H x W x 3 uint8 RGB array: cropped to `bbx` (x1, y1, x2, y2) first, then resized.

    The longer side is brought down to `max_side` (never up, as cirtorch does), the shorter up to MIN_SIDE.
    Pillow releases the GIL while decoding and resizing, so threads read images in parallel.
    """
    img = open_rgb(path)
    if bbx is not None:
        img = img.crop(crop_box(bbx, img.width, img.height, path))
    size = fit_size(img.width, img.height, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str | Path, max_side: int = DEFAULT_MAX_SIDE, bbx: Sequence[float] | None = None) -> torch.Tensor:
    """An image as a 3 x H x W float32 tensor in [0, 1]: `read_image` (crop, resize) scaled by 1/255."""
    arr = read_image(path, max_side, bbx)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def list_images(source: str | Path) -> list[Path]:
    """A folder (its image files, sorted, recursively) or a list file (one path per line, relative to the list's folder)."""
    source = Path(source)
    if not source.exists():
        raise EngineError("no such folder or image list", source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise EngineError(f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})", source)
        return paths
    try:
        lines = source.read_text().splitlines()
    except UnicodeDecodeError:
        raise EngineError("not a text image list (one path per line) nor a folder", source) from None
    paths = [Path(s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not paths:
        raise EngineError("image list is empty", source)
    return [p if p.is_absolute() else source.parent / p for p in paths]
