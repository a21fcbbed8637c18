"""Reading and checking the report's inputs: search results, a speed table, a training log."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..checks import check_float
from ..errors import EngineError
from ..results import load_results


def load_result(path: str | Path, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """A search result `RESULT.npz` (read and checked by `engine.results.load_results`) that must fit the
    ground truth: n_queries rows of ids in 0..n_gallery-1.

    Returns (ids int64, scores float32), both (n_queries, k), best first. Raises EngineError naming `path`.
    """
    ids, scores = load_results(path)
    if ids.shape[0] != n_queries:
        raise EngineError(f"results cover {ids.shape[0]} queries, the ground truth has {n_queries}", path)
    if ids.size and ids.max() >= n_gallery:
        raise EngineError(f"ids outside 0..{n_gallery - 1}: results of another gallery than the ground truth's", path)
    return ids, scores


def _read_json(path: Path, what: str):
    if not path.exists():
        raise EngineError(f"no such {what} file", path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"not valid JSON ({e})".splitlines()[0], path) from None


def load_speed(path: str | Path) -> list[dict]:
    """A speed/accuracy table: a JSON list of {label: str, images_per_s: float > 0, mAP: float (percent)}."""
    path = Path(path)
    rows = _read_json(path, "speed")
    if not isinstance(rows, list) or not rows:
        raise EngineError("speed file must be a non-empty JSON list of {label, images_per_s, mAP}", path)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"label", "images_per_s", "mAP"} <= set(row):
            raise EngineError(f"entry {i} must be an object with label, images_per_s and mAP", path)
        ips = check_float(row["images_per_s"], f"entry {i} images_per_s", minimum=0, open_min=True, path=path)
        out.append({"label": str(row["label"]), "images_per_s": ips, "mAP": check_float(row["mAP"], f"entry {i} mAP", path=path)})
    return out


TRAINING_KEYS = ("loss", "val_asym_mAP", "val_sym_mAP")


def load_training_log(path: str | Path) -> list[dict]:
    """A training log: JSON lines of {epoch, loss, val_asym_mAP, val_sym_mAP}, sorted by epoch.

    `epoch` is required; the other keys may be absent or null on a line (e.g. validation every few
    epochs) and come back as NaN. Blank lines are ignored.
    """
    path = Path(path)
    if not path.exists():
        raise EngineError("no such training log", path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise EngineError(f"line {n} is not valid JSON", path) from None
        if not isinstance(obj, dict) or "epoch" not in obj:
            raise EngineError(f"line {n} must be an object with an 'epoch'", path)
        row = {"epoch": check_float(obj["epoch"], f"line {n} epoch", path=path)}
        for key in TRAINING_KEYS:
            v = obj.get(key)
            row[key] = math.nan if v is None else check_float(v, f"line {n} {key}", path=path)
        rows.append(row)
    if not rows:
        raise EngineError("training log has no lines", path)
    return sorted(rows, key=lambda r: r["epoch"])
