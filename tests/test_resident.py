"""The device-resident gallery (engine.resident, `Index(device=...)`), run here on device="cpu" through the same torch
code as on CUDA: the engine's exact top-k from float16 / bfloat16 / float32 scans with rescoring, the same answers
when the gallery streams through in chunks under a tiny memory budget or is rescored from host memory, deleted rows,
shard groups, generations, rows holding NaN or inf, k beyond the gallery; and one CUDA check, skipped without a GPU."""
import numpy as np
import pytest
import torch

from engine import EngineError, Index
from engine.resident import ResidentGallery, finite_rows, order_topk, plan_memory
from engine.search import best_k, search, search_stores, store_sources
from engine.store import Store, add_copy, open_store, read_manifest, write_store

from test_index import D, unit
from test_search_core import assert_exact


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """Two stores (float32 + float16 + bfloat16 copies, shards of 64 and 50 rows) and queries."""
    root = tmp_path_factory.mktemp("resident")
    rng = np.random.default_rng(3)
    parts = [unit(rng, 300), unit(rng, 170)]
    stores = []
    for j, (g, rows) in enumerate(zip(parts, (64, 50))):
        s = write_store(root / f"s{j}", g, "space-a", shard_rows=rows)
        for dtype in ("float16", "bfloat16"):
            add_copy(s, dtype)
        stores.append(open_store(root / f"s{j}"))
    return stores, np.concatenate(parts), rng.standard_normal((7, D)).astype(np.float32)


def assert_same(got, expect, tol=1e-5):
    """Scores within tol (float32 sums in another order), ids equal wherever the expected scores are not tied."""
    (s, i), (es, ei) = got, expect
    assert s.shape == i.shape == es.shape and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_allclose(s, es, atol=tol)
    gaps = np.abs(np.diff(es, axis=1)) > tol
    untied = np.ones_like(gaps[:, :1]) if es.shape[1] < 2 else None
    untied = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], gaps[:, -1:]], axis=1) if untied is None else untied
    np.testing.assert_array_equal(i[untied], ei[untied])


# The budgets: None (scan and float32 copies on the device), one that holds the scan copy only (rescoring reads host
# memory, or the scan copy itself when it is float32), and a tiny one (the scan streams through in chunks of a few rows).
BUDGETS = {"resident": None, "exact-on-host": 1.5, "streamed": 0.5}


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_device_index_answers_as_the_engine(gallery, dtype, budget):
    stores, g, q = gallery
    streamed = budget == 0.5
    if budget is not None:  # 1.5 x the scan copy: room for it and the work space, not for the float32 copy too;
        budget = int(len(g) * D * (4 if dtype == "float32" else 2) * budget)  # 0.5 x: chunks of 88 rows
    index = Index(stores, device="cpu", device_dtype=dtype, device_memory=budget)
    held = index._gallery.resident
    # a float32 scan copy is the exact copy: rescoring reads it wherever it is held, never a second copy of it
    exact_held = budget is None or (dtype == "float32" and not streamed)
    assert held.plan.resident != streamed and held.plan.exact_resident == exact_held
    assert (held.exact is not None) == exact_held and len(held.chunks) == (6 if streamed else 1)
    assert (held.exact is held.chunks[0]) == (dtype == "float32" and not streamed)
    for k in (1, 10, 100, 470, 1000):
        got = index.search(q, k, "space-a")
        assert_same(got, search_stores(stores, q, k, "space-a", scan="float32"))
        assert_exact(*got, q, g, k)
    expect = Index(stores, device="cpu", device_dtype=dtype).search(q, 25, rescore=2)
    got = index.search(q, 25, scan=dtype, rescore=2)
    np.testing.assert_array_equal(got[0], expect[0])  # streamed or not: one computation, the same bits
    np.testing.assert_array_equal(got[1], expect[1])


def test_default_dtype_and_options(gallery):
    stores, g, q = gallery
    index = Index(stores, device="cpu")
    assert index._gallery.resident.dtype == "float16"
    assert_exact(*index.search(q, 5, rescore=0), q, g, 5)  # rescore 0: the k best of the scan, scored exactly
    with pytest.raises(EngineError, match="holds the float16 copy on cpu: scan='int8'"):
        index.search(q, 5, scan="int8")
    with pytest.raises(EngineError, match="backend, threads, isa and device are options of the host search"):
        index.search(q, 5, backend="torch")
    with pytest.raises(EngineError, match="rescore"):
        index.search(q, 5, rescore=-1)
    with pytest.raises(EngineError, match="device_dtype and device_memory are options of a device index"):
        Index(stores, device_memory=10)
    with pytest.raises(EngineError, match="float16, bfloat16 or float32, not 'int8'"):
        Index(stores, device="cpu", device_dtype="int8")
    with pytest.raises(EngineError, match="unknown device"):
        Index(stores, device="tpu")
    with pytest.raises(EngineError, match="cannot hold two chunks"):
        Index(stores, device="cpu", device_memory=100)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="not available here"):
            Index(stores, device="cuda")


def test_a_device_out_of_memory_is_one_clear_error(gallery, monkeypatch):
    stores, _, _ = gallery

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(ResidentGallery, "_upload", full)
    with pytest.raises(EngineError, match=r"470 x 24 float16 rows do not fit on cpu .* pass a smaller device_memory"):
        Index(stores, device="cpu")


def test_memory_plan():
    assert plan_memory(1000, 10, "float16", None).resident
    p = plan_memory(1000, 10, "float16", 79_000)  # the scan copy and a quarter for work, not the float32 copy too
    assert p.resident and not p.exact_resident
    p = plan_memory(1000, 10, "float32", 79_000)  # a float32 scan copy is the rescoring copy: no second one to fit
    assert p.resident and p.exact_resident
    p = plan_memory(1000, 10, "float16", 8000)
    assert not p.resident and p.chunk_rows == (8000 - 2000) // 40 and p.work == 2000
    assert p.query_rows(150, 4) == 3 and p.query_rows(10**6, 4) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_rows(dtype):
    x = torch.tensor([[0.0, 1.0], [-65504.0, 3e-8], [np.inf, 0.0], [0.0, -np.inf], [np.nan, 1.0], [-0.0, 1e30]])
    x = x.to(dtype)
    np.testing.assert_array_equal(finite_rows(x), torch.isfinite(x).all(dim=1).numpy())
    assert finite_rows(x).tolist()[:5] == [True, True, False, False, False]


def test_order_topk_is_best_k():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, (50, 30)).astype(np.float32)  # many ties
    s[rng.random(s.shape) < 0.1] = np.nan
    s[rng.random(s.shape) < 0.05] = -np.inf
    pos = np.stack([rng.permutation(100)[:30] for _ in range(50)]).astype(np.int64)
    for k in (1, 7, 30):
        got = order_topk(torch.from_numpy(s), torch.from_numpy(pos), k)
        expect = best_k(s, pos, k)
        np.testing.assert_array_equal(got[0].numpy(), expect[0])
        np.testing.assert_array_equal(got[1].numpy(), expect[1])


def test_ties_go_to_the_lower_id(tmp_path):
    rng = np.random.default_rng(5)
    g = unit(rng, 200)
    g[[30, 90, 150]] = g[10]  # four equal rows
    store = write_store(tmp_path / "s", g, "space-a", shard_rows=64)
    add_copy(store, "float16")
    q = g[10:11] + 0.01 * rng.standard_normal((1, D)).astype(np.float32)
    for budget in (None, 3000):
        s, i = Index([store.path], device="cpu", device_memory=budget).search(q, 6)
        assert i[0, :4].tolist() == [10, 30, 90, 150] and (s[0, :4] == s[0, 0]).all()


def test_deleted_rows_shard_groups_and_generations(gallery, monkeypatch, tmp_path):
    stores, g, q = gallery
    gone = np.r_[0:5, 64:128, 200, 299].astype(np.int64)  # shard 1 of the first store wholly deleted
    first = stores[0].path
    original = Store.deleted_rows
    monkeypatch.setattr(Store, "deleted_rows", lambda self: gone.copy() if self.path == first else original(self))
    live = np.setdiff1d(np.arange(len(g)), gone)
    for budget in (None, 3000):
        index = Index(stores, device="cpu", device_memory=budget)
        assert index.count == len(live)
        for k in (3, 50, 1000):
            s, i = index.search(q, k)
            assert not np.isin(i, gone).any() and i.shape == (len(q), min(k, len(live)))
            assert_same((s, i), search_stores(stores, q, k, scan="float32"))
        group = Index([first], shards=[0, 2], device="cpu", device_memory=budget)  # rows 0-63 and 128-191
        rows = np.setdiff1d(np.r_[0:64, 128:192], gone)
        s, i = group.search(q, 200)
        assert i.shape == (len(q), len(rows)) and (np.sort(i, axis=1) == rows).all()
        assert_exact(s, np.searchsorted(rows, i), q, g[rows], 200)
    monkeypatch.setattr(Store, "deleted_rows", original)
    path = tmp_path / "live"
    old, new = unit(np.random.default_rng(1), 150), unit(np.random.default_rng(2), 180)
    write_store(path, old, "space-a", shard_rows=40)
    index = Index([path], device="cpu", device_dtype="float32")
    held = index._gallery.resident
    assert_exact(*index.search(q, 10), q, old, 10)
    write_store(path, new, "space-a", shard_rows=40, overwrite=True)
    assert index.refresh() and index._gallery.resident is not held  # uploaded again, whole
    assert_exact(*index.search(q, 10), q, new, 10)


def test_rows_holding_nan_or_inf(tmp_path):
    """Rows whose copies are not finite are scored on the host: NaN ranks last by lower id, as in the engine."""
    rng = np.random.default_rng(9)
    g = unit(rng, 120)
    store = write_store(tmp_path / "s", g, "space-a", shard_rows=50)
    add_copy(store, "float16")
    g[[3, 40, 41, 100]] = np.nan
    g[7, 2] = np.inf
    g[8, 5] = 1e6  # finite in float32, inf in float16
    for dtype in ("float32", "float16"):  # a writer refuses such rows: put them in the shards' files by hand
        for n, entry in enumerate(read_manifest(store.path)["copies"][dtype]):
            with np.errstate(over="ignore"):
                np.save(store.path / entry["file"], g[n * 50:(n + 1) * 50].astype(dtype))
    store = open_store(store.path)
    q = rng.standard_normal((5, D)).astype(np.float32)
    for budget in (None, 2000):
        index = Index([store.path], device="cpu", device_memory=budget)
        assert sorted(index._gallery.resident.nan_ids) == [3, 40, 41, 100]
        for k in (5, 117, 119, 500):
            s, i = index.search(q, k)
            es, ei = search(store, q, k, scan="float32")
            np.testing.assert_array_equal(i, ei)
            np.testing.assert_allclose(s, es, atol=1e-4, rtol=1e-6)
    s, i = Index([store.path], device="cpu").search(q, 120)
    assert (i[:, -4:] == [3, 40, 41, 100]).all() and np.isnan(s[:, -4:]).all()


def test_rows_without_a_float32_copy(tmp_path):
    """A store holding float16 only: candidates scored in float32 from that copy (the engine's scan scores)."""
    rng = np.random.default_rng(4)
    g = unit(rng, 90).astype(np.float16).astype(np.float32)
    full = write_store(tmp_path / "f", g, "space-a", shard_rows=40)
    add_copy(full, "float16")
    half = write_store(tmp_path / "h", g, "space-a", shard_rows=40, dtype="float16")
    q = rng.standard_normal((4, D)).astype(np.float32)
    assert_same(Index([half.path], device="cpu").search(q, 20), search(half, q, 20))
    assert_same(Index([half.path], device="cpu").search(q, 20), Index([full.path], device="cpu").search(q, 20))


def test_resident_gallery_of_sources_directly(gallery):
    stores, g, q = gallery
    held = ResidentGallery(store_sources(stores), "cpu", "bfloat16", 6000)
    assert not held.plan.resident and held.rows == len(g)
    assert_exact(*held.search(q, 30, 4), q, g, 30)


def matches_the_engine(tmp_path, device, n, d, nq, shard_rows, budget):
    """n x d unit rows (two of them NaN) on `device`, held whole (float16, bfloat16) and streamed through `budget`
    bytes (float16, rescored from host memory), against the engine's exact search on the host."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, d), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    store = write_store(tmp_path / "big", g, "space-a", shard_rows=shard_rows)
    add_copy(store, "float16")
    nan_rows = [5, n * 7 // 18]
    for dtype in ("float32", "float16"):  # two NaN rows, put in the shards' files by hand (a writer refuses them)
        for row in nan_rows:
            file = store.path / read_manifest(store.path)["copies"][dtype][row // shard_rows]["file"]
            shard = np.load(file)
            shard[row % shard_rows] = np.nan
            np.save(file, shard)
    store = open_store(store.path)
    q = rng.standard_normal((nq, d), dtype=np.float32)
    expect = search(store, q, 100, scan="float32")
    for dtype, limit in (("float16", None), ("bfloat16", None), ("float16", budget)):
        index = Index([store.path], device=device, device_dtype=dtype, device_memory=limit)
        held = index._gallery.resident
        assert held.plan.resident == (limit is None) and (held.plan.resident or len(held.chunks) > 2)
        assert_same(index.search(q, 100), expect, tol=1e-4)
        assert_same(index.search(q[:1], 100), (expect[0][:1], expect[1][:1]), tol=1e-4)
    s, i = index.search(q[:2], n)
    assert (i[:, -2:] == nan_rows).all() and np.isnan(s[:, -2:]).all()


def test_a_larger_gallery_streamed(tmp_path):
    matches_the_engine(tmp_path, "cpu", 3000, 32, 20, 500, 60_000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_matches_the_cpu_engine(tmp_path):
    """200k x 512 on the GPU, held whole and streamed through a 64 MiB budget, against the engine on the host."""
    matches_the_engine(tmp_path, "cuda", 200_000, 512, 300, 65536, 64 << 20)


@pytest.fixture
def cuda_as_cpu(monkeypatch):
    """`--device cuda` of the command reaches a device index that this machine builds on its CPU."""
    from engine import resident
    from engine.cli import options

    monkeypatch.setattr(options, "require_device", lambda device: None)
    monkeypatch.setattr(resident, "torch_device", lambda device: torch.device("cpu"))


def test_search_command_on_a_device(gallery, run_cli, tmp_path, cuda_as_cpu):
    from engine.results import load_results

    stores, g, q = gallery
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "r.npz"
    for scan in ("float16", "bfloat16"):
        code, _, err = run_cli("search", stores[1].path, "--queries", tmp_path / "q.npy", "-k", 15, "--out", out,
                               "--device", "cuda", "--scan", scan)
        assert code == 0, err
        ids, scores = load_results(out)
        assert_same((scores, ids), search(stores[1], q, 15, scan="float32"))
    code, _, err = run_cli("search", stores[1].path, "--queries", tmp_path / "q.npy", "--out", out, "--device", "cuda",
                           "--backend", "torch")
    assert code == 1 and "--backend and --threads choose how the host searches" in err and err.count("\n") == 1


def test_serve_command_holds_the_gallery_on_its_device(gallery, run_cli, monkeypatch, cuda_as_cpu):
    from engine.serve import app

    stores, g, q = gallery
    served = []
    monkeypatch.setattr(app, "serve", lambda index, *args: served.append(index))
    for device in ("cpu", "cuda"):
        code, _, err = run_cli("serve", *(s.path for s in stores), "--device", device)
        assert code == 0, err
    host, held = served
    assert host._gallery.resident is None and held._gallery.resident is not None
    assert_same(held.search(q, 20), host.search(q, 20, scan="float32"))


def test_one_live_row_left(gallery, monkeypatch):
    stores, g, q = gallery
    monkeypatch.setattr(Store, "deleted_rows", lambda self: np.setdiff1d(np.arange(self.count), [137]))
    s, i = Index(stores[:1], device="cpu").search(q, 10)
    assert (i == 137).all() and i.shape == (len(q), 1)
    np.testing.assert_allclose(s[:, 0], q @ g[137], rtol=1e-5)


def test_streaming_orders_copies_and_scoring(gallery, monkeypatch):
    """The CUDA lines of streaming, on stand-ins for torch.cuda that log each call: chunk i is scored only after its
    copy's event, and a buffer is refilled only after the scoring of the chunk it held (two buffers)."""
    stores, g, q = gallery
    held = ResidentGallery(store_sources(stores), "cpu", "float16", 6000)
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_event(self, event):
            log.append(("wait", self.name, event.id))

        def synchronize(self):
            log.append(("synchronize", self.name))

    class Event:
        made = 0

        def __init__(self):
            Event.made += 1
            self.id = Event.made

        def record(self, stream):
            log.append(("record", stream.name, self.id))

    class On:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            log.append(("exit", self.stream.name))

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("side"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", On)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: main)
    copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: (
        log.append(("copy", non_blocking)), copy(self, src))[1])
    seen = []
    for start, chunk in held._streamed(cuda=True):
        log.append(("score", start))
        seen.append(chunk.clone())
    monkeypatch.undo()
    n = len(held.chunks)
    assert n > 3 and all(torch.equal(a, b) for a, b in zip(seen, held.chunks))
    ready, done, scored, copies = {}, {}, [], 0
    inside = False
    for entry in log:
        if entry[0] in ("enter", "exit"):
            inside = entry[0] == "enter"
        elif entry[0] == "copy":
            assert inside and entry[1]  # on the side stream, asynchronous
            i = copies
            if i >= 2:  # its buffer held chunk i - 2: the side stream waited on that chunk's scoring
                assert waited_side == done[i - 2]
            copies += 1
        elif entry[:2] == ("wait", "side"):
            waited_side = entry[2]
        elif entry[:2] == ("record", "side"):
            ready[copies - 1] = entry[2]
        elif entry[:2] == ("wait", "main"):
            waited_main = entry[2]
        elif entry[0] == "score":
            i = len(scored)
            assert waited_main == ready[i] and copies >= min(i + 2, n)  # its copy awaited, the next one issued
            scored.append(i)
        elif entry[:2] == ("record", "main"):
            done[len(scored) - 1] = entry[2]
    assert scored == list(range(n)) and copies == n and log[-1] == ("synchronize", "side")
