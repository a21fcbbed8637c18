"""Revisited Oxford/Paris ground truth (`gnd_*.pkl`): loading, validation, and the image lists it names.

Format: {'imlist': [gallery names], 'qimlist': [query names],
         'gnd': [{'bbx': [x1, y1, x2, y2], 'easy': [...], 'hard': [...], 'junk': [...]}, ...]}
with indices into imlist; images live in a `jpg/` folder as `<name>.jpg`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import EngineError

LABEL_KEYS = ("easy", "hard", "junk")


def load_gnd(path: str | Path) -> dict:
    """Read and validate a ground-truth pickle; returns the dict (lists of ints for the labels)."""
    path = Path(path)
    if not path.exists():
        raise EngineError("ground truth not found", path)
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f)
    except Exception as e:
        raise EngineError(f"not a readable pickle ({type(e).__name__}: {e})".splitlines()[0], path) from None
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise EngineError("ground truth must be a dict with 'imlist', 'qimlist' and 'gnd'", path)
    n_gallery, n_queries = len(cfg["imlist"]), len(cfg["qimlist"])
    if len(cfg["gnd"]) != n_queries:
        raise EngineError(f"'gnd' has {len(cfg['gnd'])} entries for {n_queries} queries", path)
    for q, entry in enumerate(cfg["gnd"]):
        if not isinstance(entry, dict):
            raise EngineError(f"gnd[{q}] is not a dict", path)
        for key in LABEL_KEYS:
            idx = [int(i) for i in entry.get(key, [])]
            if any(i < 0 or i >= n_gallery for i in idx):
                raise EngineError(f"gnd[{q}]['{key}'] holds an index outside the {n_gallery}-image gallery", path)
            entry[key] = idx
        if "bbx" in entry and entry["bbx"] is not None and len(entry["bbx"]) != 4:
            raise EngineError(f"gnd[{q}]['bbx'] must be [x1, y1, x2, y2]", path)
    return cfg


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
