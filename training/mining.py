"""Choosing the other members of a training tuple: hard or random negatives, one per cluster,
and the teacher's nearest neighbours (the context of the CSD loss).

Vectors may be numpy arrays or torch tensors (any device; similarities are computed there in
float32, a block of queries at a time). Results are numpy int64 indices into the pool.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.errors import EngineError

__all__ = ["mine_hard_negatives", "nearest_neighbours", "random_negatives"]

_QUERY_BLOCK = 512  # queries per similarity block: 512 x 20,000 float32 is 40 MB


def _as_matrix(name: str, x, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x.detach())
    if t.ndim != 2:
        raise EngineError(f"{name} must be a 2-D array of vectors, got shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def _as_ids(name: str, c, n: int) -> np.ndarray:
    c = np.asarray(c.cpu() if torch.is_tensor(c) else c)
    if c.shape != (n,):
        raise EngineError(f"{name} must be 1-D with one entry per vector ({n}), got shape {c.shape}")
    return c.astype(np.int64, copy=False)


def _ranked(query: torch.Tensor, pool: torch.Tensor, k: int) -> np.ndarray:
    """Q x k pool indices, most similar (largest inner product) first."""
    out = [torch.topk(query[i:i + _QUERY_BLOCK] @ pool.T, k, dim=1).indices.cpu()
           for i in range(0, len(query), _QUERY_BLOCK)]
    return torch.cat(out).numpy().astype(np.int64, copy=False)


def _first_per_cluster(candidates: np.ndarray, query_clusters: np.ndarray,
                       pool_clusters: np.ndarray, neg_num: int) -> np.ndarray:
    """Walk each row of `candidates` (Q x C pool indices, in order) keeping an image if its cluster
    differs from the query's and from every image already kept, up to neg_num.

    Returns Q x neg_num int64; -1 fills the slots of a row that ran out of candidates.
    """
    cl = pool_clusters[candidates]
    # An image is the first of its cluster in its row iff it leads its run after a stable sort.
    order = np.argsort(cl, axis=1, kind="stable")
    cl_sorted = np.take_along_axis(cl, order, axis=1)
    leads = np.ones(cl.shape, dtype=bool)
    leads[:, 1:] = cl_sorted[:, 1:] != cl_sorted[:, :-1]
    keep = np.empty_like(leads)
    np.put_along_axis(keep, order, leads, axis=1)
    keep &= cl != query_clusters[:, None]
    slot = np.cumsum(keep, axis=1) - 1
    keep &= slot < neg_num
    out = np.full((len(candidates), neg_num), -1, dtype=np.int64)
    rows, cols = np.nonzero(keep)
    out[rows, slot[rows, cols]] = candidates[rows, cols]
    return out


def _check_complete(negatives: np.ndarray, query_clusters: np.ndarray, pool_clusters: np.ndarray,
                    neg_num: int) -> None:
    short = np.flatnonzero((negatives < 0).any(axis=1))
    if len(short):
        q = int(short[0])
        others = len(np.setdiff1d(np.unique(pool_clusters), [query_clusters[q]]))
        raise EngineError(f"cannot pick {neg_num} negatives for query {q} (cluster {query_clusters[q]}): "
                          f"the pool has only {others} clusters other than the query's; "
                          f"use a larger pool or fewer negatives")


def mine_hard_negatives(query_vecs, pool_vecs, query_clusters, pool_clusters, neg_num: int = 5,
                        candidates: int = 256) -> np.ndarray:
    """Hard negatives: rank the pool by s(q) . t(x), walk down, keep an image if its cluster differs
    from the query's and from every negative already kept, until neg_num.

    query_vecs: Q x D (student); pool_vecs: P x D (teacher); query_clusters: (Q,), pool_clusters:
    (P,) integer cluster ids. Only the top `candidates` of each ranking are walked first; a query
    that finds too few there walks its full ranking.
    Returns Q x neg_num int64 pool indices, hardest first. Raises EngineError when a query's pool
    has fewer than neg_num other clusters.
    """
    query = _as_matrix("query_vecs", query_vecs)
    pool = _as_matrix("pool_vecs", pool_vecs, device=query.device)
    if query.shape[1] != pool.shape[1]:
        raise EngineError(f"query_vecs (D = {query.shape[1]}) and pool_vecs (D = {pool.shape[1]}) differ in dimension")
    qc = _as_ids("query_clusters", query_clusters, len(query))
    pc = _as_ids("pool_clusters", pool_clusters, len(pool))
    negatives = _first_per_cluster(_ranked(query, pool, min(candidates, len(pool))), qc, pc, neg_num)
    short = np.flatnonzero((negatives < 0).any(axis=1))
    if len(short):
        negatives[short] = _first_per_cluster(_ranked(query[short], pool, len(pool)), qc[short], pc, neg_num)
    _check_complete(negatives, qc, pc, neg_num)
    return negatives


def random_negatives(query_clusters, pool_clusters, neg_num: int = 5, seed: int = 0,
                     candidates: int = 256) -> np.ndarray:
    """Random negatives with the hard-negative contract: per query, neg_num pool images from
    distinct clusters, none from the query's cluster, in a random order (seeded).

    query_clusters: (Q,), pool_clusters: (P,) integer cluster ids.
    Returns Q x neg_num int64 pool indices. Raises EngineError when too few clusters.
    """
    qc = _as_ids("query_clusters", query_clusters, len(query_clusters))
    pc = _as_ids("pool_clusters", pool_clusters, len(pool_clusters))
    rng = np.random.default_rng(seed)
    # Uniform draws with replacement: keeping first occurrences gives the same law as walking a
    # random permutation, without a Q x P permutation matrix.
    negatives = _first_per_cluster(rng.integers(0, len(pc), size=(len(qc), candidates)), qc, pc, neg_num)
    short = np.flatnonzero((negatives < 0).any(axis=1))
    if len(short):
        walks = np.stack([rng.permutation(len(pc)) for _ in short])
        negatives[short] = _first_per_cluster(walks, qc[short], pc, neg_num)
    _check_complete(negatives, qc, pc, neg_num)
    return negatives


def nearest_neighbours(query_vecs, pool_vecs, k: int, exclude=None) -> np.ndarray:
    """The k most similar pool vectors of each query by inner product (the teacher's top-K
    neighbours r_1..K of CSD when both are teacher vectors).

    query_vecs: Q x D, pool_vecs: P x D; exclude: optional (Q,) pool index per query to leave out
    (the query's own row when the queries are part of the pool).
    Returns Q x k int64 pool indices, most similar first.
    """
    query = _as_matrix("query_vecs", query_vecs)
    pool = _as_matrix("pool_vecs", pool_vecs, device=query.device)
    extra = 0 if exclude is None else 1
    if not 1 <= k <= len(pool) - extra:
        raise EngineError(f"k = {k} neighbours asked from a pool of {len(pool)}"
                          f"{' less the excluded row' if extra else ''}")
    ranked = _ranked(query, pool, k + extra)
    if exclude is None:
        return ranked
    excluded = ranked == _as_ids("exclude", exclude, len(query))[:, None]
    # A stable sort on the flag moves the excluded index (if present) to the end of its row.
    order = np.argsort(excluded, axis=1, kind="stable")
    return np.take_along_axis(ranked, order, axis=1)[:, :k]
