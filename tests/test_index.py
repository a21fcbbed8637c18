"""The resident index: search_stores's exact answers from views held open, concurrent searches (the pool runs
jobs side by side), deleted rows never returned, and refresh to a new generation seen whole."""
import importlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from engine import EngineError, Index, _search
from engine.files import write_text
from engine.search import merge_topk, search, search_stores
from engine.store import MANIFEST, Store, add_copy, open_store, write_store

from test_search_core import assert_exact

search_module = importlib.import_module("engine.search")  # the package exports a function of the same name

D = 24


def unit(rng, n):
    g = rng.standard_normal((n, D)).astype(np.float32)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Three stores (every copy, shards of different sizes) and their rows concatenated, with queries."""
    root = tmp_path_factory.mktemp("index")
    rng = np.random.default_rng(7)
    parts = [unit(rng, n) for n in (400, 250, 130)]
    stores = []
    for j, (g, rows) in enumerate(zip(parts, (128, 100, 64))):
        s = write_store(root / f"s{j}", g, "space-a", names=[f"s{j}/{r}" for r in range(len(g))], shard_rows=rows)
        for dtype in ("float16", "bfloat16", "int8"):
            add_copy(s, dtype)
        stores.append(open_store(root / f"s{j}"))
    return stores, np.concatenate(parts), rng.standard_normal((9, D)).astype(np.float32)


def set_generation(path, generation):
    """Publish the store's manifest again with another generation (the growth side raises it on each change)."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["generation"] = generation
    write_text(path / MANIFEST, json.dumps(manifest))


SETTINGS = [
    dict(),
    dict(scan="float32"),
    dict(scan="float16", rescore=3),
    dict(scan="bfloat16", rescore=0),
    dict(scan="int8", rescore=2),
    dict(scan="int8", rescore=0, threads=1),
    dict(scan="int8", backend="faiss"),
    dict(scan="float16", rescore=2, backend="torch"),
]


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("options", SETTINGS, ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_index_answers_as_search_stores(gallery, in_memory, options):
    stores, g, q = gallery
    index = Index([s.path for s in stores], in_memory=in_memory)
    assert (index.count, index.dim, index.space) == (780, D, "space-a")
    assert index.generation == tuple(s.generation for s in stores) and min(index.generation) >= 1  # each published
    for k in (1, 17, 400, 5000):
        s, i = index.search(q, k, "space-a", **options)
        expect = search_stores(stores, q, k, "space-a", **options)
        np.testing.assert_array_equal(s, expect[0])
        np.testing.assert_array_equal(i, expect[1])
    s, i = index.search(q, 30, scan="int8", rescore=100)  # every row rescored: float32-exact
    assert_exact(s, i, q, g, 30)
    names = [n for store in stores for n in store.names()]
    assert index.names(i) == [[names[r] for r in row] for row in i.tolist()]


def test_index_holds_its_views_open(gallery, monkeypatch):
    """After opening, a search maps nothing: the store's shards are never reopened."""
    stores, g, q = gallery
    index = Index(stores)
    expect = index.search(q, 12, scan="int8")

    def refuse(*args, **kwargs):
        raise AssertionError("a shard was mapped again")

    monkeypatch.setattr(Store, "shards", refuse)
    monkeypatch.setattr(np, "load", refuse)
    for _ in range(3):
        np.testing.assert_array_equal(index.search(q, 12, scan="int8")[1], expect[1])
    with pytest.raises(AssertionError, match="mapped again"):  # the one-shot search maps as it goes
        search_stores(stores, q, 12)


def test_in_memory_index_reads_every_copy_into_ram(gallery):
    stores, _, _ = gallery
    index = Index(stores[:1], in_memory=True)
    src = index._gallery.sources[0]
    for dtype in stores[0].dtypes:
        for view in src.shards(dtype):
            assert not isinstance(view.vectors, np.memmap) and view.vectors.flags.owndata
            assert view.scale is None or not isinstance(view.scale, np.memmap)


def test_index_of_a_shard_group(gallery):
    """shards= holds some shards of one store: ids stay the store's rows, and groups merge to the whole."""
    stores, g, q = gallery
    store = stores[0]  # shards of 128 rows: 0-127, 128-255, 256-383, 384-399
    a, b = Index([store.path], shards=[0, 2]), Index([store.path], shards={1, 3})
    assert (a.count, b.count) == (256, 144)
    rows_a = np.r_[0:128, 256:384]
    s, i = a.search(q, 20, scan="float32")
    assert np.isin(i, rows_a).all()
    assert_exact(s, np.searchsorted(rows_a, i), q, g[rows_a], 20)
    merged = merge_topk(*a.search(q, 20), *b.search(q, 20), 20)
    whole = search(store, q, 20)
    np.testing.assert_array_equal(merged[0], whole[0])
    np.testing.assert_array_equal(merged[1], whole[1])
    for bad, match in (([], "empty"), ([4], r"shards \[4\] are not in the store"), ([-1], "integers >= 0"), (["0"], "integers")):
        with pytest.raises(EngineError, match=match):
            Index([store.path], shards=bad)
    with pytest.raises(EngineError, match="single store"):
        Index(stores[:2], shards=[0])


# ---------------------------------------------------------------- deleted rows


@pytest.fixture
def tombstones(gallery, monkeypatch):
    """Rows of the first store marked deleted (a whole shard among them), through Store.deleted_rows."""
    stores, g, q = gallery
    gone = np.r_[0:5, 128:256, 300, 301, 399].astype(np.int64)  # shard 1 (128-255) wholly deleted
    first = stores[0].path
    original = Store.deleted_rows
    monkeypatch.setattr(Store, "deleted_rows", lambda self: gone.copy() if self.path == first else original(self))
    live = np.setdiff1d(np.arange(len(g)), gone)
    return gone, live


@pytest.mark.parametrize("options", SETTINGS + [dict(scan="float32", backend="faiss"), dict(scan="bfloat16", backend="torch")],
                         ids=lambda o: "-".join(f"{v}" for v in o.values()) or "default")
def test_deleted_rows_are_never_returned(gallery, tombstones, options):
    stores, g, q = gallery
    gone, live = tombstones
    index = Index(stores)
    assert index.count == len(g) - len(gone)
    for k in (1, 10, 700, 5000):
        s, i = search_stores(stores, q, k, **options)
        assert i.shape == (len(q), min(k, len(live)))
        assert not np.isin(i, gone).any()
        assert (np.sort(i, axis=1)[:, 1:] != np.sort(i, axis=1)[:, :-1]).all()  # distinct rows
        si, ii = index.search(q, k, **options)
        np.testing.assert_array_equal(si, s)
        np.testing.assert_array_equal(ii, i)
        if options.get("scan", "float32") == "float32" or options.get("rescore", 1) == 0:
            continue
        # rescored from a wide enough candidate list: the live rows' own exact top k, ids kept
        s, i = index.search(q, k, **{**options, "rescore": 10_000})
        assert_exact(s, np.searchsorted(live, i), q, g[live], k)
    s, i = index.search(q, 15, scan="float32")
    assert_exact(s, np.searchsorted(live, i), q, g[live], 15)


def test_a_shard_group_keeps_only_its_own_deleted_rows(gallery, tombstones):
    stores, g, q = gallery
    gone, _ = tombstones
    group = Index([stores[0].path], shards=[0, 2])  # rows 0-127 and 256-383: 5 and 2 of them deleted
    live = np.setdiff1d(np.r_[0:128, 256:384], gone)
    assert group.count == len(live) == 249
    s, i = group.search(q, 300, scan="float32")
    assert i.shape == (len(q), 249) and (np.sort(i, axis=1) == live).all()
    assert_exact(s, np.searchsorted(live, i), q, g[live], 300)


def test_one_store_wholly_deleted(gallery, monkeypatch):
    stores, g, q = gallery
    monkeypatch.setattr(Store, "deleted_rows", lambda self: np.arange(self.count, dtype=np.int64))
    with pytest.raises(EngineError, match="every row of the gallery was removed"):
        search(stores[0], q, 5)
    with pytest.raises(EngineError, match="every row of the gallery was removed"):
        Index(stores).search(q, 5)


# ---------------------------------------------------------------- concurrency


def test_pool_runs_concurrent_jobs_side_by_side():
    """Jobs from several Python threads are inside the engine's pool at once (one job at a time would never meet)."""
    for jobs in (2, 4):
        with ThreadPoolExecutor(jobs) as pool:
            met = list(pool.map(lambda _: _search.pool_rendezvous(jobs, threads=2, timeout=60.0), range(jobs)))
        assert met == [True] * jobs
    assert _search.pool_stats()["running"] == 0
    assert _search.pool_stats()["peak"] >= 4


def test_threads_searching_one_index_match_one_thread(gallery):
    stores, _, _ = gallery
    index = Index(stores)
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((n, D)).astype(np.float32) for n in (1, 3, 16, 40, 7, 2, 33, 64)]
    settings = [dict(scan="int8"), dict(scan="float32", threads=2), dict(scan="float16", rescore=2, threads=3)]
    jobs = [(b, opt) for b in blocks for opt in settings]
    alone = [index.search(b, 25, **opt) for b, opt in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: index.search(job[0], 25, **job[1]), jobs * 3))
    for (s, i), (es, ei) in zip(together, alone * 3):
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(i, ei)


# ---------------------------------------------------------------- generations


@pytest.fixture
def two_generations(tmp_path):
    rng = np.random.default_rng(11)
    old, new = unit(rng, 600), unit(rng, 600)
    path = tmp_path / "live"
    write_store(path, old, "space-a", shard_rows=100)
    set_generation(path, 1)
    return path, old, new, rng.standard_normal((5, D)).astype(np.float32)


def publish(path, vectors, generation):
    write_store(path, vectors, "space-a", shard_rows=100, overwrite=True)
    set_generation(path, generation)


def test_refresh_moves_to_a_new_generation_whole(two_generations):
    path, old, new, q = two_generations
    index = Index([path])
    assert index.generation == (1,) and not index.refresh()
    publish(path, new, 2)
    assert_exact(*index.search(q, 10), q, old, 10)  # still the gallery it opened
    assert index.refresh() and index.generation == (2,) and not index.refresh()
    assert_exact(*index.search(q, 10), q, new, 10)


def test_a_search_in_flight_keeps_its_generation(two_generations, monkeypatch):
    """A refresh that lands while a search is between shards does not change that search's gallery."""
    path, old, new, q = two_generations
    index = Index([path])
    expect_old = search(open_store(path), q, 10)
    scan_shard = search_module._search_shard
    calls = []

    def scan_then_publish(*args):
        calls.append(1)
        if len(calls) == 1:  # after the first shard: a writer publishes generation 2, the index moves to it
            publish(path, new, 2)
            assert index.refresh()
        return scan_shard(*args)

    monkeypatch.setattr(search_module, "_search_shard", scan_then_publish)
    s, i = index.search(q, 10)
    assert len(calls) == 6  # the six shards of the old generation
    np.testing.assert_array_equal(i, expect_old[1])
    np.testing.assert_array_equal(s, expect_old[0])
    expect_new = search(open_store(path), q, 10)
    np.testing.assert_array_equal(index.search(q, 10)[1], expect_new[1])


def test_readers_see_one_generation_or_the_other(two_generations):
    """Reader threads search while a writer rewrites the store and a refresher reloads: every answer is the old
    gallery's or the new one's, never a mix."""
    path, old, new, q = two_generations
    index = Index([path])
    answers = {"old": search_stores([open_store(path)], q, 8)}
    done = threading.Event()
    seen, errors = [], []

    def read():
        try:
            while not done.is_set():
                seen.append(index.search(q, 8))
        except BaseException as e:  # ends the test instead of leaving it waiting for answers
            errors.append(repr(e))
            done.set()

    def wait_for(n):
        while len(seen) < n and not done.is_set():
            threading.Event().wait(0.01)

    def reload():
        while not done.is_set():
            try:
                index.refresh()
            except EngineError as e:  # the store is mid-rewrite: the index keeps its gallery
                errors.append(str(e))

    threads = [threading.Thread(target=read) for _ in range(3)] + [threading.Thread(target=reload)]
    for t in threads:
        t.start()
    try:
        wait_for(3)  # answers from the old generation
        publish(path, new, 2)
        answers["new"] = search_stores([open_store(path)], q, 8)
        index.refresh()
        wait_for(len(seen) + 4)  # each of the 3 readers ends at most one search begun before: one is new
    finally:
        done.set()
        for t in threads:
            t.join()
    assert all(any(why in e for why in ("incomplete", "being written", "changed")) for e in errors), errors[:3]
    kinds = []
    for s, i in seen:
        kind = next((name for name, (es, ei) in answers.items() if np.array_equal(i, ei) and np.array_equal(s, es)), None)
        assert kind is not None, "an answer of neither generation"
        kinds.append(kind)
    assert "old" in kinds and "new" in kinds and index.generation == (2,)
    assert not np.array_equal(answers["old"][1], answers["new"][1])
