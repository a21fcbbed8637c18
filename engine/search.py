"""Exact top-k by inner product over a store: the C++ kernel per shard, merged here across shards."""
from __future__ import annotations

import numpy as np

from .errors import EngineError
from .store import Store


def check_queries(store: Store, queries: np.ndarray, k: int, space: str | None = None) -> np.ndarray:
    """Validate queries against a store before any work; returns them as C-contiguous float32 (Q x D)."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2:
        raise EngineError(f"queries must be a Q x D array, got shape {q.shape}")
    if q.shape[1] != store.dim:
        raise EngineError(f"queries have D = {q.shape[1]}, the store has D = {store.dim}", store.path)
    if space and store.space and space != store.space:
        raise EngineError(f"queries are in space {space!r}, the store in {store.space!r}: asymmetric search needs one space", store.path)
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise EngineError(f"k must be a positive integer, got {k}")
    if store.count == 0:
        raise EngineError("store is empty", store.path)
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
        raise EngineError(f"query {bad} holds NaN or infinite values")
    return q


def merge_topk(scores_a, ids_a, scores_b, ids_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-query top lists (Q x ka, Q x kb) into the k best, score descending, ties by lower id."""
    scores = np.concatenate([scores_a, scores_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def search(store: Store, queries: np.ndarray, k: int, space: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows of `store` for each query by inner product.

    queries: Q x D float32 (a single D vector is taken as Q = 1); space: the queries' embedding-space id,
    refused if it differs from the store's. Returns (scores float32 Q x k', ids int64 Q x k'),
    k' = min(k, store.count), best first, ids being the store's row numbers.
    """
    from . import _search

    q = check_queries(store, queries, k, space)
    k = int(k)
    scores = np.zeros((len(q), 0), np.float32)
    ids = np.zeros((len(q), 0), np.int64)
    for shard in store.shards(store.exact_dtype):
        s, i = _search.topk(q, shard.as_float32(), k, shard.start)
        scores, ids = merge_topk(scores, ids, s, i, k)
    return scores, ids
