"""Small JPEG thumbnails for the report, made once and kept while newer than their source."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import EngineError
from ..files import writing
from ..images import open_rgb

BBX_COLOUR = (255, 214, 0)


def thumb_name(src: Path, size: int, bbx: Sequence[float] | None = None) -> str:
    """A file name unique to (source path, size, bbx) that still reads as the image's name."""
    key = f"{Path(src).resolve()}|{size}|{None if bbx is None else [round(float(v), 3) for v in bbx]}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(src).stem)[:40]
    return f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.jpg"


def make_thumb(src: Path, dest: Path, size: int, bbx: Sequence[float] | None = None) -> bool:
    """Write a thumbnail of `src` (longest side `size` px) to `dest`, the query box outlined if `bbx`.

    bbx: [x1, y1, x2, y2] in the source image's pixels (as the encoders see it: EXIF-rotated). Skips the
    work when `dest` exists and is not older than `src`. Returns False when `src` is missing or refused by
    the engine's decoder (`images.open_rgb`: undecodable, or a decompression bomb); nothing is written then.
    """
    try:
        src_mtime = os.stat(src).st_mtime_ns
    except OSError:
        return False
    if dest.exists() and dest.stat().st_mtime_ns >= src_mtime:
        return True
    try:
        im = open_rgb(src)
    except EngineError:
        return False
    w, h = im.size
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    if bbx is not None:
        sx, sy = im.width / w, im.height / h
        x1, y1, x2, y2 = (float(v) for v in bbx)
        ImageDraw.Draw(im).rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=BBX_COLOUR, width=max(2, size // 64))
    with writing(dest) as f:  # a half-written thumbnail is never taken for an up-to-date one
        im.save(f, "JPEG", quality=85)
    return True


def thumbnails(
    requests: Sequence[tuple[Path, Sequence[float] | None, int]], thumbs_dir: Path
) -> list[str | None]:
    """Thumbnails for (source, bbx or None, size) requests under `thumbs_dir`.

    Returns, per request, the thumbnail's file name inside `thumbs_dir`, or None when the source
    is missing or unreadable. Repeated requests are made once.
    """
    done: dict[tuple, str | None] = {}
    out = []
    for src, bbx, size in requests:
        key = (str(src), None if bbx is None else tuple(bbx), size)
        if key not in done:
            name = thumb_name(src, size, bbx)
            done[key] = name if make_thumb(Path(src), thumbs_dir / name, size, bbx) else None
        out.append(done[key])
    return out
