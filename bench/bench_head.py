"""The descriptor head's GPU time against its memory bound, and the encoder's forward eager vs as CUDA graphs.

Run on a CUDA machine (about a minute on an H200, Triton compiling included; prints markdown tables to stdout):
    python bench/bench_head.py
and on a CPU, to check that the script works (tiny shapes, the Triton kernels in Triton's interpreter, CUDA-only
rows left empty; the times mean nothing):
    python bench/bench_head.py --tiny

Head (B=64, C=2048, 24 x 24, D=2048; fp32 NCHW, fp32 channels_last, bf16 channels_last), per variant:
- "Triton, launched": `kernels.gem_whiten` called from Python, three kernel launches;
- "Triton, CUDA graph": the same calls captured once and replayed: no host launches, the floor of these kernels;
- "Triton, tf32x3 whitening, CUDA graph": the whitening's product on tensor cores (three TF32 products, near fp32)
  instead of exact fp32 on the FMA units;
- "GeM alone" and "whitening + L2", as graphs: the stages apart, to see which one is off its bound (with tf32x3;
  in the first case the whitening also split over C into other numbers of programs; for bf16 maps GeM with
  other tiles, triton_head.GEM_TILE_CANDIDATES);
- "eager torch, launched": the reference, for scale.
GPU time: triton.testing.do_bench (CUDA events, L2 flushed between calls), median. Bound: the bytes the variant
must read (map, W, b) at the read bandwidth measured here (a 1 GiB float32 sum). rel err: max|out - ref| / max|ref|
against the torch reference on the same input, from the variant's last call (for a graph, its last replay; on the
CPU, where graph rows have no time, from a plain call).

Encoder (EfficientNet-Lite0 student, channels_last float32, images already on the device): images/s of the torch
runner eager and with CUDA graphs (engine.backends.GraphedForward), wall time over repeated calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Before kernels.triton_head is imported: Triton chooses interpreter or compiler when it decorates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from engine.backends import capture_cuda_graph, make_runner  # noqa: E402
from engine.models import build_student  # noqa: E402
from gpu_report import table  # noqa: E402  (the script's folder is on sys.path: one markdown table for the bench)
from kernels import triton_head  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
HEAD_CASES = [("fp32, NCHW", torch.float32, False), ("fp32, channels_last", torch.float32, True),
              ("bf16, channels_last", torch.bfloat16, True)]
HEAD_SHAPE = {"full": (64, 2048, 24, 24, 2048), "tiny": (4, 40, 5, 6, 24)}  # B, C, H, W, D
ENCODER_CASES = {"full": [(1024, 16), (362, 64)], "tiny": [(64, 2)]}  # side, batch
ENCODER_REPS = {"full": 30, "tiny": 2}
SPLIT_PROGRAMS = {"full": (128, 512, 1024), "tiny": (2,)}  # whitening grids tried beside WHITEN_PROGRAMS


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def gpu_us(fn) -> float:
    """Median microseconds of one call of `fn`: GPU time (do_bench) on CUDA, wall time on the CPU."""
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def graph_us(fn) -> tuple[float, torch.Tensor] | None:
    """GPU microseconds of `fn` replayed as a CUDA graph, and the graph's output after the last replay; None on CPU."""
    if not CUDA:
        return None
    graph, out = capture_cuda_graph(fn, DEVICE)
    return gpu_us(graph.replay), out


def read_gbps() -> float:
    """The device's read bandwidth in GB/s: a float32 sum of 1 GiB (CUDA) or 16 MiB (CPU)."""
    big = torch.ones((1 << 28) if CUDA else (1 << 22), device=DEVICE)
    return big.numel() * 4 / gpu_us(lambda: big.sum()) / 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def head_rows(size: str, gbps: float) -> list[list[str]]:
    B, C, H, Wd, D = HEAD_SHAPE[size]
    rows = []
    for case, dtype, channels_last in HEAD_CASES:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.relu(torch.randn(B, C, H, Wd, device=DEVICE, generator=g)).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        W = torch.randn(D, C, device=DEVICE, generator=g) / C**0.5
        b = torch.randn(D, device=DEVICE, generator=g) * 0.1
        p = torch.tensor([3.0], device=DEVICE)
        ref = kernels.gem_whiten_reference(x, p, W, b)
        pooled = triton_head.gem_pool(x, p)
        programs = triton_head.INTERPRETER_PROGRAMS if triton_head.INTERPRETED else triton_head.WHITEN_PROGRAMS

        def head():
            return kernels.gem_whiten(x, p, W, b, backend="triton")

        def whiten_l2(precision="ieee", programs=programs):
            return lambda: triton_head.finish(*triton_head.whiten_partials(pooled, W, programs, precision), b)

        def head_tf32x3():
            return triton_head.finish(*triton_head.whiten_partials(triton_head.gem_pool(x, p), W, programs, "tf32x3"), b)

        whitened = kernels.gem_whiten_reference(pooled[:, :, None, None], 1.0, W, b)  # GeM of a 1 x 1 map at p = 1: g
        variants = [  # name, fn, launched (True) or graph, bytes it must read, reference of its output
            ("Triton, launched", head, True, nbytes(x, W, b), ref),
            ("Triton, CUDA graph", head, False, nbytes(x, W, b), ref),
            ("Triton, tf32x3 whitening, CUDA graph", head_tf32x3, False, nbytes(x, W, b), ref),
            ("GeM alone, CUDA graph", lambda: triton_head.gem_pool(x, p), False, nbytes(x), kernels.gem(x, p)),
            ("whitening + L2, CUDA graph", whiten_l2(), False, nbytes(pooled, W, b), whitened),
            ("whitening (tf32x3) + L2, CUDA graph", whiten_l2("tf32x3"), False, nbytes(pooled, W, b), whitened),
            ("eager torch, launched", lambda: kernels.gem_whiten_reference(x, p, W, b), True, nbytes(x, W, b), ref),
        ]
        if case == HEAD_CASES[0][0]:  # the split of C was tuned while launches hid the GPU time: other splits
            variants += [(f"whitening ({precision}) + L2, {n} programs, CUDA graph", whiten_l2(precision, n), False,
                          nbytes(pooled, W, b), whitened)
                         for precision in ("ieee", "tf32x3") for n in SPLIT_PROGRAMS[size]]
        if dtype == torch.bfloat16:  # its GeM reads at 0.75 of the bound with the default tile: try others
            variants += [(f"GeM alone, tile {tile}, CUDA graph", lambda tile=tile: triton_head.gem_pool(x, p, tile), False,
                          nbytes(x), kernels.gem(x, p)) for tile in triton_head.GEM_TILE_CANDIDATES]
        for name, fn, launched, read, want in variants:
            bound = read / gbps / 1e3
            try:
                out = fn()  # also the warm-up (Triton compiles); on the CPU the one check of a graph variant's numbers
                us = gpu_us(fn) if launched else None
                if not launched and (timed := graph_us(fn)) is not None:
                    us, out = timed
            except Exception as e:  # a variant that fails to compile or capture: say so, measure the others
                rows.append([case, name, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}", "", "", ""])
                continue
            ratio = "-" if us is None else f"{us / bound:.2f}x"
            rows.append([case, name, "-" if us is None else f"{us:.1f}", f"{bound:.1f}", ratio, f"{rel_err(out, want):.1e}"])
    return rows


def encoder_rows(size: str) -> list[list[str]]:
    rows = []
    enc = build_student("effnet-lite0", 1280, "bench")
    eager = make_runner(enc, "torch", DEVICE, channels_last=True, cuda_graphs=False)
    graphed = make_runner(enc, "torch", DEVICE, channels_last=True, cuda_graphs=True)
    reps = ENCODER_REPS[size]
    for side, batch in ENCODER_CASES[size]:
        x = torch.rand(batch, 3, side, side, device=DEVICE)
        rates = []
        for runner in (eager, graphed):
            runner(x)  # the graphed runner: eager on a bucket's first call, captured on its second
            runner(x)
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                runner(x)
            sync()
            rates.append(reps * batch / (time.perf_counter() - t))
        diff = (eager(x) - graphed(x)).abs().max().item()
        rows.append([f"{side} px", str(batch), f"{rates[0]:.1f}", f"{rates[1]:.1f}", f"{rates[1] / rates[0]:.2f}x",
                     f"{diff:.1e}"])
    return rows


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script on a CPU (default on a CPU)")
    args = ap.parse_args(argv)
    size = "tiny" if args.tiny or not CUDA else "full"
    device = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)"
    gbps = read_gbps()
    B, C, H, Wd, D = HEAD_SHAPE[size]
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, {device}, torch {torch.__version__}; "
          f"read bandwidth {gbps:.0f} GB/s\n")
    print(f"Head, B = {B}, C = {C}, {H} x {Wd}, D = {D}: GPU us (do_bench median) against the memory bound\n")
    heads = head_rows(size, gbps)
    print("\n".join(table(["case", "variant", "GPU us", "bound us", "GPU / bound", "rel err"], heads)))
    print("\nEncoder forward, EfficientNet-Lite0 student, float32 channels_last, images on the device: images/s\n")
    print("\n".join(table(["side", "batch", "eager", "CUDA graphs", "speed-up", "max |diff|"], encoder_rows(size))))
    failed = [f"{r[0]}, {r[1]}" for r in heads if r[2].startswith("failed")]
    if failed:
        sys.exit(f"bench_head: {len(failed)} head variants failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
