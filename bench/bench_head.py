"""Throughput of the descriptor head: fused Triton kernels vs the eager torch reference vs torch.compile of it.

Run: `pytest bench/bench_head.py --benchmark-json=head.json` (add `-k small` on a CPU machine).
On CUDA every timed call ends with a synchronize, so times include launch latency; extra_info then also
holds the GPU time alone (triton.testing.do_bench: CUDA events, L2 flushed between calls) and its ratio to
the memory bound (the bytes read at the device's read bandwidth, measured here as a 1 GiB sum).
The Triton case needs CUDA (the CPU interpreter is ~100x slower than torch and says nothing
about speed); it is skipped elsewhere. extra_info: bytes_read (map + W + b) and the GB/s
they imply at the median time, to compare with the device's memory bandwidth.
Every backend is also a record of bench/report.py: a row in the table printed at the end (images/s, the ratio to
eager, on CUDA the fraction of the memory bound), head.png under --bench-out.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import kernels
import report

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name: (B, C, H, W, D, dtype, channels_last)
CASES = {
    "large-fp32-nchw": (64, 2048, 24, 24, 2048, torch.float32, False),
    "large-fp32-nhwc": (64, 2048, 24, 24, 2048, torch.float32, True),
    "large-bf16-nhwc": (64, 2048, 24, 24, 2048, torch.bfloat16, True),
    "small-fp32-nchw": (8, 512, 12, 12, 512, torch.float32, False),
}
BACKENDS = ["triton", "eager", "compile"]


def _skip_reason(case: str, backend: str) -> str | None:
    if backend == "triton" and (DEVICE != "cuda" or importlib.util.find_spec("triton") is None):
        return "the Triton head is timed on CUDA only"
    if DEVICE == "cpu" and not case.startswith("small"):
        return "large cases are for a GPU (seconds per call on a small CPU)"
    if DEVICE == "cpu" and case.endswith("bf16-nhwc"):
        return "bfloat16 maps are a GPU case"
    return None


def _head(backend: str):
    if backend == "triton":
        return lambda x, p, W, b: kernels.gem_whiten(x, p, W, b, backend="triton")
    if backend == "compile":
        # A fresh compiled function per case, static shapes: what a deployed encoder would use.
        return torch.compile(kernels.gem_whiten_reference, fullgraph=True, dynamic=False)
    return kernels.gem_whiten_reference


def _graph_us(fn) -> float | None:
    """GPU time of `fn` replayed as a CUDA graph: without the host's launch overhead, which the do_bench time
    of a few short kernels launched from Python includes. None when the call cannot be captured."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") * 1e3


@pytest.fixture(scope="session")
def read_gbps() -> float | None:
    """The device's read bandwidth (GB/s): a 1 GiB float32 sum, GPU time; None on the CPU."""
    if DEVICE != "cuda":
        return None
    from triton.testing import do_bench

    big = torch.ones(1 << 28, device=DEVICE)
    return big.numel() * 4 / do_bench(lambda: big.sum(), warmup=10, rep=100, return_mode="median") / 1e6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_head(benchmark, bench_report, read_gbps, case, backend):
    reason = _skip_reason(case, backend)
    if reason:
        pytest.skip(reason)
    B, C, H, Wd, D, dtype, channels_last = CASES[case]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.relu(torch.randn(B, C, H, Wd, device=DEVICE, generator=g)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    W = torch.randn(D, C, device=DEVICE, generator=g) / C**0.5
    b = torch.randn(D, device=DEVICE, generator=g) * 0.1
    p = torch.tensor(3.0, device=DEVICE)
    head = _head(backend)

    out = head(x, p, W, b)  # warm-up: compiles, and checks the numbers before timing them
    ref = kernels.gem_whiten_reference(x, p, W, b)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5

    def run():
        head(x, p, W, b)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    bytes_read = x.numel() * x.element_size() + W.numel() * W.element_size() + b.numel() * b.element_size()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        bytes_read=bytes_read,
        gb_per_s=round(bytes_read / benchmark.stats.stats.median / 1e9, 1),
    )
    bound = None
    if read_gbps:
        from triton.testing import do_bench

        gpu_us = do_bench(lambda: head(x, p, W, b), warmup=10, rep=100, return_mode="median") * 1e3
        bound_us = bytes_read / read_gbps / 1e3
        graph = _graph_us(lambda: head(x, p, W, b))
        benchmark.extra_info.update(gpu_us=round(gpu_us, 1), read_gbps=round(read_gbps), bound_us=round(bound_us, 1),
                                    x_bound=round(gpu_us / bound_us, 2),
                                    graph_us=graph and round(graph, 1), graph_x_bound=graph and round(graph / bound_us, 2))
        bound = bound_us / gpu_us
    # Backends are separate benchmarks: their ratio to eager is of medians taken apart. The bound (CUDA only): the
    # bytes read at the measured read bandwidth over the GPU time.
    bench_report.add(benchmark, "head", case, [report.record(
        backend, B / benchmark.stats.stats.median, benchmark.stats.stats.data, baseline="eager", unit="images/s",
        bound_fraction=bound, bound_kind="memory" if bound else None)], B=B, C=C, H=H, W=Wd, D=D, device=DEVICE)
