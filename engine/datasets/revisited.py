"""Revisited Oxford/Paris ground truth (`gnd_*.pkl`): loading, validation, and the image lists it names.

Format: {'imlist': [gallery names], 'qimlist': [query names],
         'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [...], 'hard': [...], 'junk': [...]}, ...]}
with indices into imlist; images live in a `jpg/` folder as `<name>.jpg`.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..pickles import read_pickle

LABEL_KEYS = ("easy", "hard", "junk")


def load_gnd(path: str | Path) -> dict:
    """Read and validate a ground-truth pickle (read as plain data only: see engine.pickles).

    Returns {'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [4 floats] or None, 'easy'|'hard'|'junk':
    [int]}]} (numpy arrays in the file become lists; other keys of an entry are kept). Raises EngineError
    naming the file, the entry and the problem: names that are not non-empty strings, labels that are not
    integer indices into imlist, a bbx that is not 4 finite numbers x1 < x2, y1 < y2.
    """
    path = Path(path)
    if not path.exists():
        raise EngineError("ground truth not found", path)
    cfg = read_pickle(path)
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise EngineError("ground truth must be a dict with 'imlist', 'qimlist' and 'gnd'", path)
    cfg["imlist"] = names_list(cfg["imlist"], path, "imlist")
    cfg["qimlist"] = names_list(cfg["qimlist"], path, "qimlist")
    n_gallery, n_queries = len(cfg["imlist"]), len(cfg["qimlist"])
    entries = cfg["gnd"]
    if not isinstance(entries, (list, tuple)):
        raise EngineError(f"'gnd' must be a list of dicts, one per query, not {describe_value(entries)}", path)
    if len(entries) != n_queries:
        raise EngineError(f"'gnd' has {len(entries)} entries for {n_queries} queries", path)
    cfg["gnd"] = [_entry(entry, q, n_gallery, path) for q, entry in enumerate(entries)]
    return cfg


def names_list(values, path: Path, what: str) -> list[str]:
    """`values` (a list, tuple or 1-d string array) as a list of non-empty str, or an EngineError naming `what`."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "U":
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise EngineError(f"'{what}' must be a list of names, not {describe_value(values)}", path)
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise EngineError(f"'{what}'[{i}] must be a non-empty string, not {describe_value(v)}", path)
    return [str(v) for v in values]


def _entry(entry, q: int, n_gallery: int, path: Path) -> dict:
    if not isinstance(entry, dict):
        raise EngineError(f"gnd[{q}] must be a dict, not {describe_value(entry)}", path)
    entry = dict(entry)
    for key in LABEL_KEYS:
        entry[key] = _indices(entry.get(key, []), n_gallery, path, f"gnd[{q}]['{key}']")
    if entry.get("bbx") is not None:
        entry["bbx"] = _bbx(entry["bbx"], path, f"gnd[{q}]['bbx']")
    return entry


def _indices(values, n: int, path: Path, what: str) -> list[int]:
    """Gallery indices as a list of int: integers (Python or numpy, not bool) in [0, n)."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise EngineError(f"{what} must be a flat list of integer indices, got a {values.dtype} array of shape {values.shape}", path)
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise EngineError(f"{what} must be a list of integer indices, not {describe_value(values)}", path)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise EngineError(f"{what}[{i}] must be an integer index, not {describe_value(v)}", path)
        if not 0 <= v < n:
            raise EngineError(f"{what}[{i}] = {v} is outside the {n}-image gallery", path)
    return [int(v) for v in values]


def _bbx(values, path: Path, what: str) -> list[float]:
    """[x1, y1, x2, y2] as 4 finite floats with x1 < x2 and y1 < y2."""
    if isinstance(values, np.ndarray):
        values = values.tolist() if values.ndim == 1 else None
    ok = isinstance(values, (list, tuple)) and len(values) == 4 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or not (values[0] < values[2] and values[1] < values[3]):
        raise EngineError(f"{what} must be 4 finite numbers [x1, y1, x2, y2] with x1 < x2 and y1 < y2, "
                          f"got {_short(values)}", path)
    return [float(v) for v in values]


def describe_value(value) -> str:
    """A value's type and, shortened, the value itself: for error messages about the content of a file."""
    return f"{type(value).__name__} {_short(value)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def images_dir_for(gnd_path: str | Path) -> Path:
    """The `jpg/` folder beside a ground-truth file or one level up (revisitop and views layouts)."""
    gnd_path = Path(gnd_path)
    for cand in (gnd_path.parent / "jpg", gnd_path.parent.parent / "jpg"):
        if cand.is_dir():
            return cand
    raise EngineError("no jpg/ folder beside or above the ground truth: pass --images DIR", gnd_path)


def image_path(images_dir: Path, name: str) -> Path:
    """Revisitop names carry no extension; names that already have one are kept."""
    p = images_dir / name
    return p if p.suffix else p.with_suffix(".jpg")


def gallery_items(cfg: dict, images_dir: Path) -> list[tuple[Path, None]]:
    return [(image_path(images_dir, n), None) for n in cfg["imlist"]]


def query_items(cfg: dict, images_dir: Path) -> list[tuple[Path, list[float] | None]]:
    """Query images with their bbx (queries are cropped before encoding)."""
    return [(image_path(images_dir, n), cfg["gnd"][i].get("bbx")) for i, n in enumerate(cfg["qimlist"])]
