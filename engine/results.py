"""A search result on disk, `RESULT.npz`: its one writer and its one reader.

Format: an uncompressed .npz holding `ids` (Q x k, int64, gallery row numbers, best first) and `scores`
(Q x k, float32, the matching inner products, non-increasing along a row).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from .errors import EngineError
from .files import write_bytes


def save_results(path: str | Path, ids: np.ndarray, scores: np.ndarray) -> None:
    """Write a search result to `path` (ids as int64, scores as float32, both Q x k) into place, atomically."""
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    if ids.ndim != 2 or ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be the same Q x k shape")
    buf = io.BytesIO()
    np.savez(buf, ids=ids.astype(np.int64, copy=False), scores=scores.astype(np.float32, copy=False))
    write_bytes(path, buf.getvalue())


def load_results(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a `RESULT.npz` written by `save_results` (or by anyone, in that format) and check it whole.

    Returns (ids int64 Q x k, scores float32 Q x k). Raises EngineError naming `path` when the file is
    missing, a folder, not an .npz, lacks `ids` or `scores`, holds ids that are not integers (float ids
    are refused, not truncated) or are negative, scores that are not real numbers, or arrays that are
    not 2-d of one shape. Duplicate ids within a row are refused too (`evaluate.check_ranks`).
    """
    from .evaluate import check_ranks

    path = Path(path)
    if not path.exists():
        raise EngineError("no such results file", path)
    if path.is_dir():
        raise EngineError("is a folder, not a results .npz", path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EngineError(f"not a readable results .npz ({type(e).__name__})", path) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise EngineError("not a results .npz (a single array: an .npy?)", path)
    with data:
        missing = [name for name in ("ids", "scores") if name not in data.files]
        if missing:
            raise EngineError(f"results .npz has no {' or '.join(repr(m) for m in missing)} array", path)
        try:
            ids, scores = data["ids"], data["scores"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a damaged member, or one of objects
            raise EngineError(f"not a readable results .npz ({type(e).__name__})", path) from None
    if not np.issubdtype(scores.dtype, np.floating) and not np.issubdtype(scores.dtype, np.integer):
        raise EngineError(f"'scores' must be real numbers, got {scores.dtype}", path)
    if scores.shape != ids.shape:
        raise EngineError(f"'scores' has shape {scores.shape}, 'ids' {ids.shape}: they must match", path)
    ranks = check_ranks(ids.T, path=path)  # ids are Q x k; ranks are k x Q
    return np.ascontiguousarray(ranks.T), scores.astype(np.float32, copy=False)
