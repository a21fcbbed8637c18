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
the exact float32 top 100, and the machine's measured bounds (memory read bandwidth, float32 matmul peak). The
session writes a summary table into the "Search" section of bench/RESULTS.md. The engine is timed per call of
its shard kernel on the whole gallery as one shard (what search() does per shard); compressed scans rescore
100 * R candidates (R = 4) against float32. Figures on a shared machine still move with its load; the ratios
of one round's calls are reported beside the ratios of medians.
AML_BENCH_DEVICE=cuda (bench/gpu_check.sh) adds the GPU search path: "torch-cuda" is what `engine search --backend
torch --device cuda` does per shard (the float16 copy sent to the device, widened, scored in float32, top
4k rescored on the host), "torch-cuda-resident" the matmul + topk on a gallery already on the device (the floor
of a GPU scan). Methods whose library is not installed (faiss on the GPU machine) are left out and said so.
"""
from __future__ import annotations

import datetime
import importlib.util
import itertools
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

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
CUDA = os.environ.get("AML_BENCH_DEVICE", "cpu") == "cuda"
SLOW_BASELINES = ("faiss-sq-fp16", "faiss-sq-8bit", "torch")
METHODS = [
    "engine-float32", "engine-float16", "engine-bfloat16", "engine-int8",
    "faiss-flat", "faiss-sq-fp16", "faiss-sq-8bit", "torch",
] + (["torch-cuda", "torch-cuda-resident"] if CUDA else [])
RESULTS = Path(__file__).with_name("RESULTS.md")
ROWS: list[dict] = []


def load_average() -> str:
    """The 1-minute load average now (how busy the shared machine is)."""
    return open("/proc/loadavg").read().split()[0]


LOADS: list[str] = [load_average()]


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


@pytest.fixture(scope="session")
def bounds():
    """Measured memory read bandwidth (GB/s, all cores, 1 GiB: the faster of numpy xor-reduce and torch sum)
    and float32 matmul peak (GFLOP/s, torch, all cores)."""
    import torch

    threads = _search.default_threads()
    a = np.ones(1 << 27, np.uint64)  # 1 GiB
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as ex:  # numpy reductions release the GIL
        t = best_time(lambda: list(ex.map(np.bitwise_xor.reduce, parts)))
    bandwidth = a.nbytes / t / 1e9
    del a, parts
    f = torch.ones(1 << 28)  # 1 GiB
    bandwidth = max(bandwidth, f.numel() * 4 / best_time(lambda: f.sum()) / 1e9)
    del f
    m = torch.randn(2048, 2048)
    flops = 2 * 2048**3 / best_time(lambda: m @ m) / 1e9
    return {"mem_read_GBps": round(bandwidth, 1), "fp32_peak_GFLOPs": round(flops, 1)}


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
            copies = {dt: quantize.encode(g, dt) for dt in quantize.DTYPES[1:]}
            cache[(n, d)] = (g, copies, q, {})
        return cache[(n, d)]

    return get


def exact_ids(g, q, cache):
    if len(q) not in cache:
        _, cache[len(q)] = _search.search_shard(q, g, "float32", K)
    return cache[len(q)]


def runner(method, g, copies, q):
    """A no-argument callable returning ids (Q x K), and the bytes scanned per call."""
    d = g.shape[1]
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
def test_search(benchmark, bounds, galleries, n, d, nq):
    methods, left = methods_for(n, d, nq)
    if not methods:
        pytest.skip("; ".join(left))
    LOADS.append(load_average())
    g, copies, queries, truth = galleries(n, d)
    q = np.ascontiguousarray(queries[:nq])
    ref = exact_ids(g, q, truth)
    fns, nbytes, recall = {}, {}, {}
    for m in methods:
        fns[m], nbytes[m] = runner(m, g, copies, q)
        ids = fns[m]()  # the warm-up call; every method is deterministic, so its ids are those of the rounds
        recall[m] = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids, ref)]))
    one_round, times = interleaved(fns)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    LOADS.append(load_average())
    rows = {}
    for m in methods:
        t = float(np.median(times[m]))
        rows[m] = {
            "N": n, "D": d, "Q": nq, "method": m, "qps": nq / t, "GBps": nbytes[m] / t / 1e9,
            "GFLOPs": 2 * nq * n * d / t / 1e9, "recall": recall[m], "times": times[m], **bounds,
        }
        ROWS.append(rows[m])
    benchmark.extra_info.update({"N": n, "D": d, "Q": nq, "left_out": left, "methods": rows})


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = re.search(r"Model name:\s*(.+)", out)
    return f"{name.group(1).strip() if name else 'unknown CPU'}, {os.cpu_count()} logical CPUs"


def per_round(a: dict, b: dict) -> str:
    """The spread of one round's ratios, a's queries/s over b's (rows of one case, same round index), as
    'rounds LO-HIx'."""
    ratios = [tb / ta for ta, tb in zip(a["times"], b["times"])]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"


def summary(rows: list[dict]) -> str:
    """The "Search" section: one line per (N, D, Q) with queries/s per method and the target ratios."""
    b = rows[0]
    lines = [
        "## Search",
        "",
        f"{datetime.date.today()}, {machine()}; measured bounds: memory read {b['mem_read_GBps']} GB/s, "
        f"fp32 matmul {b['fp32_peak_GFLOPs']} GFLOP/s. k = {K}, medians of {ROUNDS} interleaved rounds, "
        f"engine compressed scans rescore {RESCORE}k candidates in float32. "
        f"Command: `AML_BENCH_GRID={_GRID} AML_BENCH_ROUNDS={ROUNDS} pytest bench/bench_search.py`. Shared machine: "
        f"1-minute load average {min(LOADS, key=float)} to {max(LOADS, key=float)} during the run (2 cores), so absolute figures are "
        "depressed and noisy; every method of a case runs once per round (see the docstring). '-': not run.",
        "",
        "Queries/s (recall@100 in brackets when below 1):",
        "",
        "| N | D | Q | " + " | ".join(METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    by = {}
    for r in rows:
        by.setdefault((r["N"], r["D"], r["Q"]), {})[r["method"]] = r
    for (n, d, nq), ms in by.items():
        cells = []
        for m in METHODS:
            r = ms.get(m)
            cells.append("-" if r is None else f"{r['qps']:.4g}" + (f" ({r['recall']:.3f})" if r["recall"] < 0.9995 else ""))
        lines.append(f"| {n} | {d} | {nq} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios (engine / baseline: of the medians, then the range of one round's; GB/s of the float16/bfloat16 "
        "scan over the read bound):",
        "",
    ]
    for (n, d, nq), ms in by.items():
        if "faiss-flat" not in ms:
            continue
        flat = ms["faiss-flat"]["qps"]
        eng = {m: ms[m] for m in ms if m.startswith("engine-")}
        best = max(eng.values(), key=lambda r: r["qps"])
        fr = ms["faiss-flat"]
        parts = [f"best engine ({best['method'][7:]}) {best['qps'] / flat:.2f}x faiss-flat ({per_round(best, fr)})"]
        if "engine-float32" in eng:
            parts.append(f"float32 {eng['engine-float32']['qps'] / flat:.2f}x ({per_round(eng['engine-float32'], fr)})")
        if nq == 1 and "faiss-sq-fp16" in ms:
            for m in ("engine-float16", "engine-bfloat16"):
                if m in eng:
                    r = eng[m]
                    parts.append(
                        f"{m[7:]} {r['qps'] / ms['faiss-sq-fp16']['qps']:.2f}x faiss-sq-fp16 "
                        f"({per_round(r, ms['faiss-sq-fp16'])}), "
                        f"{r['GBps']:.1f} GB/s = {r['GBps'] / r['mem_read_GBps']:.2f} of the bound"
                    )
        lines.append(f"- N {n}, D {d}, Q {nq}: " + "; ".join(parts))
    lines += ["", "The issue's targets, this run:", ""] + [f"- {t}" for t in targets(by)]
    return "\n".join(lines) + "\n"


def targets(by: dict) -> list[str]:
    """Each target of the issue checked against one (N, D, Q) row: 'met' or 'NOT met' with the measured ratio."""
    out = []

    def check(name, value, bound):
        out.append(f"{name}: {value:.2f} (target {bound}) {'met' if value >= bound else 'NOT met'}")

    for (n, d, nq), ms in by.items():
        qps = {m: r["qps"] for m, r in ms.items()}
        if "faiss-flat" not in qps:
            continue
        where = f"N {n}, D {d}, Q {nq}"
        flat = qps["faiss-flat"]
        best = max(v for m, v in qps.items() if m.startswith("engine-"))
        if nq in (1, 64):
            check(f"{where}: best engine / faiss-flat", best / flat, 3.0)
        if nq == 1 and "faiss-sq-fp16" in qps:
            for m in ("engine-float16", "engine-bfloat16"):
                if m in ms:
                    check(f"{where}: {m[7:]} / faiss-sq-fp16", qps[m] / qps["faiss-sq-fp16"], 1.3)
                    check(f"{where}: {m[7:]} GB/s x 1.3 / read bound", ms[m]["GBps"] * 1.3 / ms[m]["mem_read_GBps"], 1.0)
        if nq == 1024:
            if "engine-float32" in qps:
                check(f"{where}: float32 / faiss-flat", qps["engine-float32"] / flat, 1.0)
            comp = [m for m in ("engine-bfloat16", "engine-int8") if m in ms and ms[m]["recall"] >= 0.999]
            if comp:
                m = max(comp, key=qps.get)
                check(f"{where}: {m[7:]} + rescoring (recall {ms[m]['recall']:.4f}) / faiss-flat", qps[m] / flat, 1.8)
    return out


def write_section(text: str) -> None:
    """Replace (or append) the "## Search" section of RESULTS.md, leaving the other sections alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Search\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


@pytest.fixture(scope="session", autouse=True)
def write_results():
    yield
    if ROWS:
        write_section(summary(ROWS))
