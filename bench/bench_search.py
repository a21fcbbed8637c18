"""Top-k search throughput: the engine kernel per dtype against faiss and torch, side by side.

Run: `pytest bench/bench_search.py --benchmark-json=search.json` (default grid, a few minutes on 2 cores);
`AML_BENCH_GRID=full` runs N in {100k, 1M} x D in {128, 512, 2048} x Q in {1, 64, 1024}, dropping methods
whose copies would not fit in half the available memory; `AML_BENCH_GRID=100000x512x1,1000000x128x64` runs the
cases listed. The faiss scalar-quantizer baselines and torch, which no target at Q = 1024 refers to and which
take minutes there on 2 cores, run only for Q <= 64 (`AML_BENCH_ALL=1` runs them everywhere).
One benchmark per (N, D, Q): after one warm-up call each, round r calls every method once (timed with
time.perf_counter, the order rotated by one each round) before round r + 1 calls any, so that the ratios
compare the same minutes of a shared machine; pytest-benchmark's own statistics are those of whole rounds.
k = 100, per-method medians over AML_BENCH_ROUNDS rounds (default 5). extra_info holds, per method, the round
times, queries/s, GB/s (bytes of the scanned copy per second), GFLOP/s (2 Q N D per second), recall@100 against
the exact float32 top 100, and the machine's measured bounds (memory read bandwidth, float32 matmul peak);
extra_info["report"] the same per method in bench/report.py's schema (rate, ratio to faiss-flat of the same rounds,
fraction of the bound: bytes / bandwidth or 2 Q N D / peak, whichever is the longer time, the peak for float32
arithmetic only), which bench/conftest.py
prints as a table at the end and plots under --bench-out (queries/s against Q per (N, D)). Nothing tracked is
written; `--update-results` records the figures in bench/RESULTS.md. The engine is timed per call of
its shard kernel on the whole gallery as one shard (what search() does per shard); compressed scans rescore
100 * R candidates (R = 4) against float32. Figures on a shared machine still move with its load; the ratios
of one round's calls are reported beside the ratios of medians.
AML_BENCH_DEVICE=cuda (bench/gpu_check.sh) adds the GPU search paths: "resident-cuda" is the product's device index
(`engine.Index(store, device="cuda")`, what `engine search/serve --device cuda` run: the float16 copy uploaded once,
query blocks scored by matmul, k * 4 candidates rescored in float32 from the float32 copy on the device), timed per
`Index.search` call with the results back on the host; its bound is the time the float16 copy takes at the device's
read bandwidth (measured: a sum over a 4 GiB device tensor). "torch-cuda" is the library's torch backend on CUDA
per shard (`engine.search(..., backend="torch", device="cuda")`: the float16 copy sent over PCIe on every call),
"torch-cuda-resident" a bare float32 matmul + topk on a gallery already on the device. AML_BENCH_DEVICE=cpu-resident
runs the same device index on the host ("resident-cpu", `device="cpu"`: the code path checked without a GPU).
AML_BENCH_METHODS=a,b,... runs only the methods named (e.g. engine-float32,engine-int8,resident-cuda). The device
index reads a store written once per (N, D) to a temporary folder. Methods whose library is not installed (faiss on
the GPU machine) are left out and said so.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import report
from engine import _search, quantize

K = 100
RESCORE = 4
ROUNDS = int(os.environ.get("AML_BENCH_ROUNDS", "5"))
FULL = os.environ.get("AML_BENCH_GRID", "small") == "full"
_GRID = os.environ.get("AML_BENCH_GRID", "small")
if FULL:
    GRID = list(itertools.product([100_000, 1_000_000], [128, 512, 2048], [1, 64, 1024]))
elif _GRID == "small":
    GRID = [(100_000, 128, 1), (100_000, 128, 64), (100_000, 128, 1024), (100_000, 512, 1), (100_000, 512, 64)]
else:
    GRID = [tuple(int(v) for v in case.split("x")) for case in _GRID.split(",")]
ALL_METHODS = os.environ.get("AML_BENCH_ALL") == "1"
DEVICE = os.environ.get("AML_BENCH_DEVICE", "cpu")
CUDA = DEVICE == "cuda"
RESIDENT = {"cuda": "resident-cuda", "cpu-resident": "resident-cpu"}.get(DEVICE)
SLOW_BASELINES = ("faiss-sq-fp16", "faiss-sq-8bit", "torch")
METHODS = [
    "engine-float32", "engine-float16", "engine-bfloat16", "engine-int8",
    "faiss-flat", "faiss-sq-fp16", "faiss-sq-8bit", "torch",
] + (["torch-cuda", "torch-cuda-resident"] if CUDA else []) + ([RESIDENT] if RESIDENT else [])
if os.environ.get("AML_BENCH_METHODS"):
    _ONLY = os.environ["AML_BENCH_METHODS"].split(",")
    if set(_ONLY) - set(METHODS):
        raise ValueError(f"AML_BENCH_METHODS: unknown {sorted(set(_ONLY) - set(METHODS))}, known: {METHODS}")
    METHODS = [m for m in METHODS if m in _ONLY]
BASELINE = "faiss-flat"
# The methods whose arithmetic is float32 multiply-adds, for which the float32 matmul peak is a compute bound; the
# engine's bfloat16 (dpbf16) and int8 (VNNI / vpmaddwd) scans have faster instructions, whose peak is not measured
# here, so only the memory bound is theirs. The GPU methods have neither of these (host) bounds.
FP32_ARITHMETIC = {"engine-float32", "engine-float16", "faiss-flat", "faiss-sq-fp16", "faiss-sq-8bit", "torch"}


def available_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 1 << 34


def best_time(fn, rounds=5) -> float:
    """The fastest of `rounds` calls after a warm-up: a bound is what the machine can do, not its average."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


PROBE_MIB = int(os.environ.get("AML_BENCH_PROBE_MIB", "1024"))  # far beyond the caches; tests make it small


@pytest.fixture(scope="session")
def bounds():
    """Measured memory read bandwidth (GB/s, all cores, AML_BENCH_PROBE_MIB = 1 GiB: the faster of numpy xor-reduce
    and torch sum) and float32 matmul peak (GFLOP/s, torch, all cores)."""
    import torch

    threads = _search.default_threads()
    a = np.ones(PROBE_MIB << 17, np.uint64)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as ex:  # numpy reductions release the GIL
        t = best_time(lambda: list(ex.map(np.bitwise_xor.reduce, parts)))
    bandwidth = a.nbytes / t / 1e9
    del a, parts
    f = torch.ones(PROBE_MIB << 18)
    bandwidth = max(bandwidth, f.numel() * 4 / best_time(lambda: f.sum()) / 1e9)
    del f
    m = torch.randn(2048, 2048)
    flops = 2 * 2048**3 / best_time(lambda: m @ m) / 1e9
    out = {"mem_read_GBps": round(bandwidth, 1), "fp32_peak_GFLOPs": round(flops, 1)}
    if CUDA:  # the device's read bandwidth: the bound of a scan of the resident float16 copy
        x = torch.ones(2 << 30, dtype=torch.float16, device="cuda")
        out["device_read_GBps"] = round(x.nbytes / best_time(lambda: (x.sum(), torch.cuda.synchronize())) / 1e9, 1)
        del x
        torch.cuda.empty_cache()
    return out


@pytest.fixture(scope="module")
def device_indexes(tmp_path_factory):
    """(g, device) -> engine.Index(device=...) over a store of g (float32 + float16 copies), written once per (N, D);
    the last one only is kept (its device memory freed before the next is built)."""
    from engine import Index
    from engine.store import add_copy, write_store

    held: dict = {}

    def get(g, device):
        key = (g.shape, device)
        if key not in held:
            held.clear()
            path = tmp_path_factory.mktemp("store") / "gallery"
            add_copy(write_store(path, g, "bench", shard_rows=65536), "float16")
            held[key] = Index([path], device=device, device_dtype="float16")
        return held[key]

    return get


class Copies(dict):
    """The gallery's compressed copies (dtype -> quantize.encode's (stored, scale)), each made when first asked for."""

    def __init__(self, g: np.ndarray):
        super().__init__()
        self.g = g

    def __missing__(self, dtype):
        self[dtype] = quantize.encode(self.g, dtype)
        return self[dtype]


@pytest.fixture(scope="module")
def galleries():
    """(N, D) -> (gallery float32 unit rows, its copies, exact top-100 of the queries); built once, largest last."""
    cache: dict = {}

    def get(n, d):
        if (n, d) not in cache:
            cache.clear()
            rng = np.random.default_rng(0)
            g = rng.standard_normal((n, d), dtype=np.float32)
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            q = rng.standard_normal((max(q for *_, q in GRID), d), dtype=np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            copies = Copies(g)
            cache[(n, d)] = (g, copies, q, {})
        return cache[(n, d)]

    return get


def exact_ids(g, q, cache):
    if len(q) not in cache:
        _, cache[len(q)] = _search.search_shard(q, g, "float32", K)
    return cache[len(q)]


def runner(method, g, copies, q, device_indexes=None):
    """A no-argument callable returning ids (Q x K), and the bytes scanned per call."""
    d = g.shape[1]
    if method.startswith("resident-"):
        index = device_indexes(g, "cuda" if method == "resident-cuda" else "cpu")
        return (lambda: index.search(q, K, rescore=RESCORE)[1]), g.nbytes // 2
    if method.startswith("engine-"):
        dt = method.split("-", 1)[1]
        stored, scale = (g, None) if dt == "float32" else copies[dt]
        r = 0 if dt == "float32" else RESCORE
        return (lambda: _search.search_shard(q, stored, dt, K, scale=scale, exact=g, rescore=r)[1]), stored.nbytes
    if method == "torch":
        import torch

        tg, tq = torch.from_numpy(g), torch.from_numpy(q)
        return (lambda: torch.topk(tq @ tg.T, K, dim=1).indices.numpy()), g.nbytes
    if method == "torch-cuda":
        from engine.search import _search_shard
        from engine.store import ShardView

        half = ShardView(0, 0, len(g), "float16", copies["float16"][0], None)
        exact = ShardView(0, 0, len(g), "float32", g, None)
        return (lambda: _search_shard(q, half, exact, K, RESCORE, "torch", 0, "auto", "cuda")[1]), g.nbytes // 2
    if method == "torch-cuda-resident":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        tg = torch.from_numpy(g).cuda()
        return (lambda: torch.topk(torch.from_numpy(q).cuda() @ tg.T, K, dim=1).indices.cpu().numpy()), g.nbytes
    import faiss

    if method == "faiss-flat":
        index = faiss.IndexFlatIP(d)
        nbytes = g.nbytes
    else:
        qt = faiss.ScalarQuantizer.QT_fp16 if method == "faiss-sq-fp16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT)
        index.train(g[:100_000])
        nbytes = g.nbytes // (2 if method == "faiss-sq-fp16" else 4)
    index.add(g)
    return (lambda: index.search(q, K)[1]), nbytes


def methods_for(n, d, nq) -> tuple[list[str], list[str]]:
    """The methods run for one case, and a note per method left out (slow baselines at Q > 64; copies that
    would take the case past half the available memory, counted cumulatively since all are held at once)."""
    budget = available_bytes() // 2 - n * d * (4 + 2 + 2 + 1)  # the float32 gallery and the engine's copies
    extra = {"faiss-flat": 4, "faiss-sq-fp16": 2, "faiss-sq-8bit": 1}  # bytes per value held by each index
    run, left = [], []
    if budget < 0:
        return [], [f"gallery copies need {n * d * 9 / 2**30:.1f} GiB, more than half the available memory"]
    for m in METHODS:
        if m.startswith("faiss") and importlib.util.find_spec("faiss") is None:
            left.append(f"{m}: faiss is not installed here")
            continue
        if nq > 64 and m in SLOW_BASELINES and not ALL_METHODS:
            left.append(f"{m} runs for Q <= 64 only (AML_BENCH_ALL=1 runs it here)")
            continue
        need = n * d * extra.get(m, 0)
        if need > budget:
            left.append(f"{m}: its index needs {need / 2**30:.1f} GiB more than half the available memory allows")
            continue
        budget -= need
        run.append(m)
    return run, left


def interleaved(fns: dict) -> tuple:
    """For no-argument callables `fns` (name -> callable): a callable running one round, in which every one of
    them runs once in an order rotated by one per round (no method always follows the same other's cache
    traffic), and the dict (name -> list of seconds per call, one per round) that the rounds fill."""
    names = list(fns)
    times: dict[str, list[float]] = {m: [] for m in names}
    rounds = itertools.count()

    def one_round():
        r = next(rounds) % len(names)
        for m in names[r:] + names[:r]:
            t0 = time.perf_counter()
            fns[m]()
            times[m].append(time.perf_counter() - t0)

    return one_round, times


@pytest.mark.parametrize("n, d, nq", GRID, ids=[f"N{n}-D{d}-Q{q}" for n, d, q in GRID])
def test_search(benchmark, bench_report, bounds, galleries, device_indexes, n, d, nq):
    methods, left = methods_for(n, d, nq)
    if not methods:
        pytest.skip("; ".join(left))
    load = [os.getloadavg()[0]]
    g, copies, queries, truth = galleries(n, d)
    q = np.ascontiguousarray(queries[:nq])
    ref = exact_ids(g, q, truth)
    fns, nbytes, recall = {}, {}, {}
    for m in methods:
        fns[m], nbytes[m] = runner(m, g, copies, q, device_indexes)
        ids = fns[m]()  # the warm-up call; every method is deterministic, so its ids are those of the rounds
        recall[m] = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids, ref)]))
    one_round, times = interleaved(fns)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    load.append(os.getloadavg()[0])
    baseline = BASELINE if BASELINE in methods else methods[0]
    ratios = report.interleaved_ratios(times, baseline)
    rows, records = {}, []
    for m in methods:
        t = float(np.median(times[m]))
        rows[m] = {
            "N": n, "D": d, "Q": nq, "method": m, "qps": nq / t, "GBps": nbytes[m] / t / 1e9,
            "GFLOPs": 2 * nq * n * d / t / 1e9, "recall": recall[m], "times": times[m], **bounds,
        }
        # The fraction of the bound: the time the scan's bytes take at the read bandwidth, or its flops at the peak
        # (float32 arithmetic only), whichever is longer, over the time measured.
        # Past the ridge (float32 arithmetic would be compute bound) a bfloat16 / int8 scan's bound is its unmeasured
        # instruction peak: none is given rather than a memory fraction near 0.
        memory = rows[m]["GBps"] / bounds["mem_read_GBps"]
        compute = rows[m]["GFLOPs"] / bounds["fp32_peak_GFLOPs"]
        ridge = 2 * nq / bounds["fp32_peak_GFLOPs"] > 4 / bounds["mem_read_GBps"]
        if m == "resident-cuda":  # the float16 copy read once at the device's bandwidth
            fraction, kind = rows[m]["GBps"] / bounds["device_read_GBps"], "device memory"
            rows[m]["device_bound_qps"] = nq * bounds["device_read_GBps"] * 1e9 / nbytes[m]
        elif m.startswith("torch-cuda") or (m not in FP32_ARITHMETIC and ridge):
            fraction, kind = None, None
        elif m in FP32_ARITHMETIC and compute > memory:
            fraction, kind = compute, "compute"
        else:
            fraction, kind = memory, "memory"
        records.append(report.record(
            m, nq / t, times[m], baseline=baseline, unit="queries/s", ratio=ratios[m][0], ratio_rounds=ratios[m][1],
            bound_fraction=fraction, bound_kind=kind, recall=recall[m]))
    benchmark.extra_info.update({"N": n, "D": d, "Q": nq, "left_out": left, "methods": rows})
    bench_report.add(benchmark, "search", f"N{n}-D{d}-Q{nq}", records, N=n, D=d, Q=nq, k=K, rescore=RESCORE,
                     load_avg_1min=load, left_out=left, **bounds)
