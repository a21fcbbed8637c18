"""The search service under load: `engine serve` on loopback against sequential in-process `Index.search`.

Run: `pytest bench/bench_serve.py -s --benchmark-json=serve.json` (N = 1M x D = 512, float32 + int8 copies,
searched as the service does by default: the int8 copy scanned, 4k candidates rescored in float32, k = 100).
`AML_SERVE_N=200000` (and AML_SERVE_D) for a smaller gallery; the store is built once into AML_SERVE_CACHE
(default ~/.cache/aml-engine/bench-serve) and reused. Each case is bounded in count and time: the in-process
baseline runs at most AML_SERVE_QUERIES single-query searches (default 1000) for at most AML_SERVE_SECONDS
(default 60); each served case sends at most that many single-query requests from 1, 16, 64 concurrent client
threads (AML_SERVE_CLIENTS=1,16,64) through engine.Client, within the same time bound.
The server is the real command (`engine serve STORE`, defaults: --max-batch 64, --max-wait-ms 2) in its own
process; the load generator shares the machine with it, as a client on the same host would. Reported per
case: queries/s, latency p50 / p99 (ms, per request as the client sees it), errors (failed requests), wrong
(answers that differ from in-process search of the same query), the server's mean block size, and the ratio
of queries/s to sequential in-process single-query search. The table is printed at the end of the session.
AML_SERVE_NAMES=0 asks for ids and scores only (no name lookup); AML_SERVE_BLOCKS sets `engine serve --blocks`.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import report

import engine
from engine.index import Index
from engine.store import MANIFEST, StoreWriter, add_copy, open_store

N = int(os.environ.get("AML_SERVE_N", "1000000"))
D = int(os.environ.get("AML_SERVE_D", "512"))
K = 100
QUERIES = int(os.environ.get("AML_SERVE_QUERIES", "1000"))
SECONDS = float(os.environ.get("AML_SERVE_SECONDS", "60"))
CLIENTS = [int(c) for c in os.environ.get("AML_SERVE_CLIENTS", "1,16,64").split(",")]
BLOCKS = os.environ.get("AML_SERVE_BLOCKS", "2")  # engine serve --blocks: query blocks scanned at once
NAMES = os.environ.get("AML_SERVE_NAMES", "1") == "1"  # 0: ids and scores only (no name lookup per block)
CACHE = Path(os.environ.get("AML_SERVE_CACHE", Path.home() / ".cache" / "aml-engine" / "bench-serve"))
SHARD_ROWS = 65536
ROWS: dict[str, dict] = {}


def build_store(path: Path) -> Path:
    """N x D unit rows (seeded), written shard by shard (memory bounded by one shard), plus an int8 copy."""
    if (path / MANIFEST).exists():
        try:
            store = open_store(path)
            if store.complete and store.count == N and "int8" in store.dtypes:
                return path
        except engine.EngineError:
            pass
    rng = np.random.default_rng(0)
    with StoreWriter(path, "bench:serve", D, "float32", SHARD_ROWS, N, overwrite=True) as writer:
        for start in range(0, N, SHARD_ROWS):
            rows = min(SHARD_ROWS, N - start)
            x = rng.standard_normal((rows, D), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            writer.add_shard(x, [str(i) for i in range(start, start + rows)])
        writer.finish()
    add_copy(path, "int8")
    return path


@pytest.fixture(scope="module")
def store() -> Path:
    return build_store(CACHE / f"{N}x{D}.store")


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    q = np.random.default_rng(1).standard_normal((QUERIES, D), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference(store, queries) -> dict:
    """Sequential in-process single-query Index.search: its ids per query (what served answers must equal)."""
    index = Index([store])
    index.search(queries[:1], K)  # pages in the copies
    ids, latencies = {}, []
    deadline = time.monotonic() + SECONDS
    for i in range(len(queries)):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        ids[i] = index.search(queries[i:i + 1], K)[1][0]
        latencies.append(time.perf_counter() - t0)
    ROWS["in-process"] = summarize(latencies, 0, 0, sum(latencies), None)
    return ids


def summarize(latencies: list[float], errors: int, wrong: int, seconds: float, mean_block) -> dict:
    lat = np.array(latencies) * 1000.0
    return {"queries": len(lat), "qps": len(lat) / seconds if seconds else 0.0, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": errors, "wrong": wrong, "mean_block": mean_block}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):
    """`engine serve STORE` in its own process on a free loopback port; terminated by its handle."""
    port = free_port()
    command = shutil.which("engine", path=str(Path(sys.executable).parent))
    argv = [command] if command else [sys.executable, "-c", "from engine.cli import main; main()"]
    proc = subprocess.Popen([*argv, "serve", str(store), "--host", "127.0.0.1", "--port", str(port),
                             "--blocks", BLOCKS])
    url = f"http://127.0.0.1:{port}"
    client = engine.Client(url)
    try:
        for _ in range(600):
            try:
                client.health()
                break
            except engine.EngineError:
                assert proc.poll() is None, "engine serve exited"
                time.sleep(0.2)
        client.search(np.ones(D, np.float32), K)  # pages in the copies on the server's side
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)


def load(client: engine.Client, queries: np.ndarray, clients: int, reference: dict) -> dict:
    """`clients` threads sending single queries (each the next unsent one) until QUERIES are sent or SECONDS pass."""
    before = client.stats()
    counter = itertools.count()
    latencies: list[float] = []
    errors = wrong = 0
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def one_client():
        nonlocal errors, wrong
        start.wait()
        mine, bad, mismatched = [], 0, 0
        while time.monotonic() < deadline[0] and (i := next(counter)) < len(queries):
            t0 = time.perf_counter()
            try:
                ids = client.search(queries[i], K, names=NAMES)[1]
            except engine.EngineError:
                bad += 1
                continue
            mine.append(time.perf_counter() - t0)
            mismatched += i in reference and not np.array_equal(ids[0], reference[i])
        with lock:
            latencies.extend(mine)
            errors += bad
            wrong += mismatched

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + SECONDS
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    after = client.stats()
    blocks = after["blocks"] - before["blocks"]
    return summarize(latencies, errors, wrong, seconds, (after["queries"] - before["queries"]) / blocks if blocks else None)


def add_row(bench_report, benchmark, method: str, result: dict) -> None:
    """The case's row in the shared terminal table and JSON (bench/report.py): queries/s against in-process."""
    rec = report.record(method, result["qps"], [], baseline="in-process", unit="queries/s")
    bench_report.add(benchmark, "serve", f"N{N}-D{D}", [rec], N=N, D=D, k=K, p50_ms=result["p50_ms"],
                     p99_ms=result["p99_ms"], errors=result["errors"], wrong=result["wrong"])


def test_in_process_sequential(benchmark, bench_report, reference):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # measured once by the `reference` fixture
    benchmark.extra_info.update({"N": N, "D": D, "k": K, **ROWS["in-process"]})
    add_row(bench_report, benchmark, "in-process", ROWS["in-process"])


@pytest.mark.parametrize("clients", CLIENTS)
def test_served(benchmark, bench_report, server, queries, reference, clients):
    result = {}
    benchmark.pedantic(lambda: result.update(load(server, queries, clients, reference)), rounds=1, iterations=1)
    ROWS[f"{clients} clients"] = result
    benchmark.extra_info.update({"N": N, "D": D, "k": K, "clients": clients, **result})
    add_row(bench_report, benchmark, f"served-{clients}-clients", result)
    assert result["errors"] == 0 and result["wrong"] == 0


def table() -> str:
    base = ROWS.get("in-process", {}).get("qps")
    lines = [f"N {N} x D {D}, int8 scan + float32 rescoring (x4), k {K}, names {'on' if NAMES else 'off'}, --blocks {BLOCKS}; "
             f"{os.cpu_count()} cores; load average {open('/proc/loadavg').read().split()[0]}",
             "", "| case | queries | queries/s | p50 ms | p99 ms | errors | wrong | mean block | x in-process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in ROWS.items():
        block = f"{r['mean_block']:.1f}" if r["mean_block"] else "-"
        ratio = f"{r['qps'] / base:.2f}" if base else "-"
        lines.append(f"| {name} | {r['queries']} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['errors']} | {r['wrong']} | {block} | {ratio} |")
    return "\n".join(lines)


@pytest.fixture(scope="session", autouse=True)
def print_table():
    yield
    if ROWS:
        print("\n" + table())
