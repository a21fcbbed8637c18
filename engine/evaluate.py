"""The revisited Oxford/Paris evaluation protocol (Radenović et al., CVPR 2018).

Functional core: `average_precision` for one query, `compute_map` for a ranking
matrix under one protocol, `evaluate_revisited` for Easy/Medium/Hard at once.
Ranks follow the revisitop convention: an (n_gallery, n_queries) array whose
column q lists gallery indices best first.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import EngineError

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


def protocol_labels(entry: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) gallery indices of one ground-truth entry under `protocol`."""
    easy = np.asarray(entry.get("easy", []), dtype=np.int64)
    hard = np.asarray(entry.get("hard", []), dtype=np.int64)
    junk = np.asarray(entry.get("junk", []), dtype=np.int64)
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"unknown protocol {protocol!r}: expected one of {PROTOCOLS}")


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives after removing ignored images from `ranking`, ascending."""
    ranking = np.asarray(ranking)
    keep = ~np.isin(ranking, ignored)
    filtered = ranking[keep]
    return np.flatnonzero(np.isin(filtered, positives))


def average_precision(pos_ranks: np.ndarray, n_pos: int) -> float:
    """AP by the trapezoid rule over the positives' 0-based ranks (ascending); `n_pos` counts all positives."""
    ap = 0.0
    for j, r in enumerate(pos_ranks):
        prec0 = 1.0 if r == 0 else j / r
        prec1 = (j + 1) / (r + 1)
        ap += (prec0 + prec1) / 2.0
    return ap / n_pos


def precision_at(pos_ranks: np.ndarray, kappas: Sequence[int]) -> np.ndarray:
    """mP@k of one query: k' = min(max 1-based positive rank, k), precision within the first k'."""
    out = np.zeros(len(kappas))
    if len(pos_ranks) == 0:
        return out
    last = pos_ranks.max() + 1
    for i, k in enumerate(kappas):
        kk = min(last, k)
        out[i] = (pos_ranks < kk).sum() / kk
    return out


def check_ranks(ranks, n_gallery: int | None = None, path: str | Path | None = None) -> np.ndarray:
    """A ranking checked whole: (n_ranked, n_queries) integer gallery ids, each column listing an id once.

    Returns it as int64. Raises EngineError (naming `path` when given) for another number of dimensions,
    ids that are not integers (float ids are refused, not truncated), negative ids, ids >= n_gallery
    (when given), or a column that lists an id twice (which would count one positive several times).
    """
    r = np.asarray(ranks)
    if r.ndim != 2:
        raise EngineError(f"ranks must be a 2-d array (n_ranked, n_queries), got shape {r.shape}", path)
    if r.dtype == np.bool_ or not np.issubdtype(r.dtype, np.integer):
        raise EngineError(f"gallery ids must be integers, got {r.dtype} (float ids are refused, not truncated)", path)
    if r.size:
        lo, hi = int(r.min()), int(r.max())
        if lo < 0:
            raise EngineError(f"gallery ids must be >= 0, got {lo}", path)
        limit = np.iinfo(np.int64).max if n_gallery is None else n_gallery - 1
        if hi > limit:
            raise EngineError(f"gallery ids must lie in 0..{limit}, got {hi}: a ranking of another gallery?", path)
        s = np.sort(r, axis=0)
        dup = s[1:] == s[:-1]
        if dup.any():
            row, q = np.argwhere(dup)[0]
            raise EngineError(f"the ranking of query {q} lists gallery id {s[row, q]} more than once", path)
    return r.astype(np.int64, copy=False)


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], protocol: str = "medium", kappas: Sequence[int] = DEFAULT_KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mP@k of a ranking under one protocol.

    ranks: (n_gallery_ranked, n_queries) gallery indices, best first (a column may be a prefix).
    Returns (mAP, per-query AP with NaN for skipped queries, mP@kappas, per-query P@kappas), in [0, 1].
    Queries without positives are skipped, as in the reference code. A ranking that is not integer
    ids, or that lists an id twice in a column, is refused (EngineError, see `check_ranks`).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise EngineError(f"ranks have shape {ranks.shape}, expected (n_gallery, {len(gnd)})")
    ranks = check_ranks(ranks)
    n_q = len(gnd)
    aps = np.full(n_q, np.nan)
    prs = np.full((n_q, len(kappas)), np.nan)
    for q in range(n_q):
        positives, ignored = protocol_labels(gnd[q], protocol)
        if len(positives) == 0:
            continue
        pos = positive_ranks(ranks[:, q], positives, ignored)
        aps[q] = average_precision(pos, len(positives))
        prs[q] = precision_at(pos, kappas)
    valid = ~np.isnan(aps)
    if not valid.any():
        return 0.0, aps, np.zeros(len(kappas)), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def evaluate_revisited(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> dict[str, dict[str, float]]:
    """{"easy"|"medium"|"hard": {"mAP": .., "mP@1": .., ...}} in percent, unrounded."""
    out = {}
    for protocol in PROTOCOLS:
        m, _, mpk, _ = compute_map(ranks, gnd, protocol, kappas)
        out[protocol] = {"mAP": 100.0 * m, **{f"mP@{k}": 100.0 * float(v) for k, v in zip(kappas, mpk)}}
    return out


def per_query_ap(ranks: np.ndarray, gnd: Sequence[dict], protocol: str = "medium") -> np.ndarray:
    """Per-query AP in percent under one protocol; NaN where the query has no positives."""
    return 100.0 * compute_map(ranks, gnd, protocol)[1]


def ranks_from_ids(ids: np.ndarray) -> np.ndarray:
    """A search result's ids (n_queries x k, best first) as a revisitop ranks array (k x n_queries), checked
    by `check_ranks` (integer, non-negative, no id twice for one query)."""
    return np.ascontiguousarray(check_ranks(np.asarray(ids).T))


def rank_by_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(n_gallery, n_queries) ranks by inner product of in-memory vectors, best first (ties by lower index)."""
    return np.argsort(-(np.asarray(gallery) @ np.asarray(queries).T), axis=0, kind="stable")
