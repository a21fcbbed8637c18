"""Negative mining against a plain walk down the full ranking; random negatives; neighbours."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import EngineError
from training.mining import mine_hard_negatives, nearest_neighbours, random_negatives


def walk(query_vecs, pool_vecs, query_clusters, pool_clusters, neg_num):
    """The reference walk: full descending ranking, one image per new cluster, skip the query's."""
    out = []
    for q, c in zip(query_vecs, query_clusters):
        kept, seen = [], {c}
        for j in np.argsort(-(pool_vecs @ q), kind="stable"):
            if pool_clusters[j] not in seen:
                kept.append(j)
                seen.add(pool_clusters[j])
            if len(kept) == neg_num:
                break
        out.append(kept)
    return np.array(out)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((300, 12)).astype(np.float32)
    pool_clusters = rng.integers(0, 40, size=300)
    queries = rng.standard_normal((50, 12)).astype(np.float32)
    query_clusters = rng.integers(0, 40, size=50)
    return queries, pool, query_clusters, pool_clusters


@pytest.mark.parametrize("candidates", [256, 4])  # 4: most queries need the full-ranking fallback
def test_hard_negatives_follow_the_walk(data, candidates):
    queries, pool, qc, pc = data
    got = mine_hard_negatives(queries, pool, qc, pc, neg_num=5, candidates=candidates)
    assert got.shape == (50, 5) and got.dtype == np.int64
    np.testing.assert_array_equal(got, walk(queries, pool, qc, pc, 5))
    clusters = pc[got]
    assert (clusters != qc[:, None]).all()  # never the query's cluster
    assert all(len(set(row)) == 5 for row in clusters)  # one negative per cluster
    sims = np.einsum("qd,qkd->qk", queries, pool[got])
    assert (np.diff(sims, axis=1) <= 0).all()  # hardest first


def test_hard_negatives_accept_torch_tensors(data):
    queries, pool, qc, pc = data
    got = mine_hard_negatives(torch.from_numpy(queries), torch.from_numpy(pool),
                              torch.from_numpy(qc), torch.from_numpy(pc), neg_num=3)
    np.testing.assert_array_equal(got, mine_hard_negatives(queries, pool, qc, pc, neg_num=3))


def test_too_few_clusters_is_a_clear_error():
    pool = np.eye(6, dtype=np.float32)
    pool_clusters = np.array([0, 0, 1, 1, 2, 3])  # three clusters besides the query's cluster 0
    with pytest.raises(EngineError, match="only 3 clusters other than the query's"):
        mine_hard_negatives(pool[:1], pool, [0], pool_clusters, neg_num=4)
    with pytest.raises(EngineError, match="only 3 clusters"):
        random_negatives([0], pool_clusters, neg_num=4)
    assert sorted(pool_clusters[mine_hard_negatives(pool[:1], pool, [0], pool_clusters, neg_num=3)[0]]) == [1, 2, 3]


def test_shape_errors_name_the_argument(data):
    queries, pool, qc, pc = data
    with pytest.raises(EngineError, match="pool_clusters"):
        mine_hard_negatives(queries, pool, qc, pc[:-1])
    with pytest.raises(EngineError, match="differ in dimension"):
        mine_hard_negatives(queries, pool[:, :5], qc, pc)


@pytest.mark.parametrize("candidates", [256, 1])
def test_random_negatives_contract_and_seed(data, candidates):
    _, _, qc, pc = data
    got = random_negatives(qc, pc, neg_num=5, seed=3, candidates=candidates)
    assert got.shape == (50, 5) and ((got >= 0) & (got < 300)).all()
    assert (pc[got] != qc[:, None]).all()
    assert all(len(set(row)) == 5 for row in pc[got])
    np.testing.assert_array_equal(got, random_negatives(qc, pc, neg_num=5, seed=3, candidates=candidates))
    assert not np.array_equal(got, random_negatives(qc, pc, neg_num=5, seed=4, candidates=candidates))


def test_nearest_neighbours(data):
    _, pool, _, _ = data
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)  # unit rows: each is its own best match
    want = np.argsort(-(pool[:20] @ pool.T), axis=1, kind="stable")
    np.testing.assert_array_equal(nearest_neighbours(pool[:20], pool, 7), want[:, :7])
    # Leaving out each query's own row: the self-match (ranked first) disappears.
    own = nearest_neighbours(pool[:20], pool, 7, exclude=np.arange(20))
    np.testing.assert_array_equal(own, want[:, 1:8])
    with pytest.raises(EngineError, match="k = 300"):
        nearest_neighbours(pool[:2], pool, 300, exclude=[0, 1])
