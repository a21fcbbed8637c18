"""Search over stores: shards streamed and merged, scan/rescore plans, backends, several stores, errors, memory."""
import importlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine import EngineError
from engine.search import best_k, plan_scan, search, search_stores
from engine.store import add_copy, open_store, write_store

from test_search_core import assert_exact


@pytest.fixture
def gallery():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((1000, 33)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True), rng.standard_normal((6, 33)).astype(np.float32)


@pytest.fixture
def store(tmp_path, gallery):
    s = write_store(tmp_path / "s", gallery[0], "space-a", shard_rows=300)  # 4 shards, the last short
    for dtype in ("float16", "bfloat16", "int8"):
        add_copy(s, dtype)
    return open_store(tmp_path / "s", checksums=True)


@pytest.mark.parametrize("scan", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("backend", ["engine", "faiss", "torch"])
def test_every_scan_and_backend_is_exact(store, gallery, scan, backend):
    g, q = gallery
    s, i = search(store, q, 25, scan=scan, rescore=None if scan == "float32" else 8, backend=backend)
    assert_exact(s, i, q, g, 25)


search_module = importlib.import_module("engine.search")  # the package exports a function of the same name


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not cuda_available(), reason="the GPU search path needs a CUDA device")
@pytest.mark.parametrize("scan", ["float32", "float16", "int8"])
def test_gpu_search_is_exact(store, gallery, scan, monkeypatch):
    g, q = gallery
    monkeypatch.setattr(search_module, "SCORE_BLOCK_BYTES", 4 * 300 * 4)  # 4 queries per block: 6 queries, 2 blocks
    s, i = search(store, q, 25, scan=scan, rescore=None if scan == "float32" else 8, backend="torch", device="cuda")
    assert_exact(s, i, q, g, 25)


def test_torch_backend_scores_in_query_blocks(store, gallery, monkeypatch):
    g, q = gallery
    monkeypatch.setattr(search_module, "SCORE_BLOCK_BYTES", 4 * 300 * 4)
    s, i = search(store, q, 25, scan="float32", backend="torch")
    assert_exact(s, i, q, g, 25)


def test_default_plan_is_the_fastest_exact(store, tmp_path, gallery):
    assert plan_scan(store) == ("int8", 4)
    plain = write_store(tmp_path / "p", gallery[0], "space-a", shard_rows=300)
    assert plan_scan(plain) == ("float32", 0)
    assert plan_scan(store, "float32", 5) == ("float32", 0)
    s, i = search(store, gallery[1], 10)
    assert_exact(s, i, gallery[1], gallery[0], 10)


def test_store_without_float32_scans_its_best_copy(tmp_path, gallery):
    s = write_store(tmp_path / "h", gallery[0], "space-a", dtype="float16", shard_rows=256)
    assert plan_scan(s) == ("float16", 0)
    with pytest.raises(EngineError, match="needs a float32 copy"):
        search(s, gallery[1], 5, rescore=2)
    scores, ids = search(s, gallery[1], 5)
    ref = gallery[1] @ gallery[0].astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(scores, -np.sort(-ref, axis=1)[:, :5], atol=1e-4)


def test_search_stores_merges_with_global_ids(tmp_path, gallery):
    g, q = gallery
    a = write_store(tmp_path / "a", g[:400], "space-a", shard_rows=128)
    b = write_store(tmp_path / "b", g[400:], "space-a", shard_rows=500)
    s, i = search_stores([a, b], q, 30)
    assert_exact(s, i, q, g, 30)
    s, i = search_stores([a, b], q, 5000)
    assert s.shape == (6, 1000)


def test_best_k_orders_by_score_then_id_with_nan_last():
    scores = np.array([[1.0, np.nan, 3.0, np.nan, -np.inf, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], np.float32)
    ids = np.array([[4, 9, 2, 1, 3, 0], [5, 4, 3, 2, 1, 0]], np.int64)
    s, i = best_k(scores, ids, 5)
    np.testing.assert_array_equal(i, [[2, 0, 4, 3, 1], [0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(s[0], np.array([3, 1, 1, -np.inf, np.nan], np.float32))
    assert s.dtype == np.float32 and i.dtype == np.int64


def test_ties_across_shards_go_to_the_lower_id(tmp_path):
    g = np.tile(np.eye(3, dtype=np.float32), (40, 1))
    s = write_store(tmp_path / "t", g, "x", shard_rows=7)
    scores, ids = search(s, np.ones((1, 3), np.float32), 12, threads=2)
    np.testing.assert_array_equal(ids[0], np.arange(12))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, q: search(s, q[:, :5], 3), "D = 5"),
        (lambda s, q: search(s, np.where(np.arange(33) == 2, np.nan, q), 3), "NaN"),
        (lambda s, q: search(s, q, 0), "k must"),
        (lambda s, q: search(s, q, 2.5), "k must"),
        (lambda s, q: search(s, q, 3, space="space-b"), "space"),
        (lambda s, q: search(s, q.astype(str), 3), "real numbers"),
        (lambda s, q: search(s, q, 3, scan="int4"), "unknown scan"),
        (lambda s, q: search(s, q, 3, rescore=-1), "rescore"),
        (lambda s, q: search(s, q, 3, backend="annoy"), "backend"),
        (lambda s, q: search(s, q, 3, threads=-2), "threads"),
        (lambda s, q: search(s, q, 3, device="cuda"), "needs --backend torch"),
        (lambda s, q: search(s, q, 3, backend="torch", device="tpu"), "unknown device|not available"),
        (lambda s, q: search(s, q, 3, backend="torch", device="cuda:7"), "not available"),
        (lambda s, q: search_stores([], q, 3), "no stores"),
    ],
)
def test_errors_before_any_work(store, gallery, call, message):
    with pytest.raises(EngineError, match=message):
        call(store, gallery[1])


def test_missing_copy_and_empty_store(tmp_path, gallery):
    s = write_store(tmp_path / "f", gallery[0], "space-a")
    with pytest.raises(EngineError, match="no int8 copy") as e:
        search(s, gallery[1], 3, scan="int8")
    assert str(tmp_path / "f") in str(e.value)
    empty = write_store(tmp_path / "e", np.zeros((0, 33), np.float32), "space-a")
    with pytest.raises(EngineError, match="empty"):
        search(empty, gallery[1], 3)
    other = write_store(tmp_path / "o", gallery[0][:, :8], "space-a")
    with pytest.raises(EngineError, match="has D = 8"):
        search_stores([s, other], gallery[1], 3)


def test_store_larger_than_the_address_space_limit(tmp_path):
    """A 48 MiB store searched under an address-space limit 16 MiB above the process's size: shards are mmap'd one by one."""
    rng = np.random.default_rng(2)
    g = rng.standard_normal((96 * 1024, 128)).astype(np.float32)
    s = write_store(tmp_path / "big", g, "x", shard_rows=4096)
    add_copy(s, "int8")
    q = rng.standard_normal((3, 128)).astype(np.float32)
    expect = np.argsort(-(q @ g.T), axis=1)[:, :5]
    script = textwrap.dedent(
        f"""
        import resource, sys, numpy as np
        from engine.search import search
        from engine.store import open_store
        store = open_store({str(tmp_path / 'big')!r})
        q = np.load({str(tmp_path / 'q.npy')!r})
        search(store, q, 5)  # starts the thread pool and its allocator arenas before the limit
        size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + (16 << 20), resource.RLIM_INFINITY))
        try:
            np.ones(48 << 18, np.float32)  # the whole store in memory does not fit under the limit
            sys.exit("limit not enforced")
        except MemoryError:
            pass
        for scan in ("float32", "int8"):
            s, i = search(store, q, 5, scan=scan)
            np.save(sys.argv[1] + "." + scan + ".npy", i)
        """
    )
    np.save(tmp_path / "q.npy", q)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ids")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for scan in ("float32", "int8"):
        np.testing.assert_array_equal(np.load(tmp_path / f"ids.{scan}.npy"), expect)
