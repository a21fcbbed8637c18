"""The descriptor head as Triton kernels: GeM -> L2 -> [x W^T + b] -> L2, forward only.

Three launches, chosen for B=64, C=2048, 24x24, D=2048 on an H100/H200:
1. `_gem_kernel`, grid (B, C / BLOCK_C): reads the feature map exactly once (the
   only large read: 302 MB in fp32, 151 MB in bf16) and writes the pooled B x C
   means. Splitting over channel blocks gives 8192-16384 programs, enough to
   saturate HBM; a kernel fusing the whole head per image would have only B = 64
   programs (under half the 132 SMs) or need a grid-wide sync. Contiguous spatial
   axes are read as one flat axis, so the loads vectorise.
2. `_whiten_kernel`, grid (B / BLOCK_M, D / BLOCK_N, SPLIT): partial products over
   slices of C (split-K: B x D alone gives only 128 tiles), and the partial sums of
   squares of g from the same tiles: the first L2 is a row scale, applied later.
   fp32 "ieee" dot: TF32 would miss the 1e-5 agreement with the reference.
3. `_finish_kernel`, one program per row: sums the partials, applies the first
   L2's scale and the bias, then the final L2 (or only the L2 without W).
   Deterministic (fixed order, no atomics); it reads SPLIT x B x D floats (2 MB).

Inputs fp32/fp16/bf16, accumulation and output fp32; any strides (NCHW and
channels_last alike), any sizes (masked tails). p == 3 takes a multiply-only path.

Triton picks interpreter or compiler when a kernel is decorated, i.e. when this
module is imported: kernels on CPU tensors run only if TRITON_INTERPRET=1 was set
before that (the tests do so).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .reference import GEM_EPS, L2_EPS

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _gem_sum(base, mask_c, S, Wd, stride_h, stride_w, eps, p,
             CUBE: tl.constexpr, FLAT_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sum over the S = H * Wd spatial positions of max(x, eps)^p for BLOCK_C channels."""
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        if FLAT_S:
            # h and w collapse into one axis (stride_h = Wd * stride_w, as in NCHW): with stride_w = 1
            # Triton sees contiguous addresses and vectorises the loads, which // and % would prevent.
            ptrs = base + (offs_s * stride_w)[None, :]
        else:
            # h, w from the flat index, so any (h, w) strides work, not only contiguous maps.
            ptrs = base + ((offs_s // Wd) * stride_h + (offs_s % Wd) * stride_w)[None, :]
        mask = mask_c[:, None] & (offs_s < S)[None, :]
        v = tl.maximum(tl.load(ptrs, mask=mask, other=1.0).to(tl.float32), eps)
        if CUBE:
            v = v * v * v
        else:
            v = tl.exp2(p * tl.log2(v))
        acc += tl.where(mask, v, 0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _gem_kernel(x_ptr, g_ptr, p_ptr, p_val, C, H, Wd,
                stride_b, stride_c, stride_h, stride_w, eps,
                P_FROM_PTR: tl.constexpr, FLAT_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """g[b, c] = (mean_hw max(x[b, c], eps)^p)^(1/p) for one image b and BLOCK_C channels."""
    pid_b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if P_FROM_PTR:
        p = tl.load(p_ptr)
    else:
        p = p_val
    # int64 batch offset: B x C x H x W maps can pass 2^31 elements.
    base = x_ptr + pid_b.to(tl.int64) * stride_b + (offs_c * stride_c)[:, None]
    S = H * Wd
    if p == 3.0:
        total = _gem_sum(base, mask_c, S, Wd, stride_h, stride_w, eps, p, True, FLAT_S, BLOCK_C, BLOCK_S)
    else:
        total = _gem_sum(base, mask_c, S, Wd, stride_h, stride_w, eps, p, False, FLAT_S, BLOCK_C, BLOCK_S)
    # Masked lanes pool nothing; 1.0 keeps their log2 finite (they are not stored).
    g = tl.exp2(tl.log2(tl.where(mask_c, total / S, 1.0)) / p)
    tl.store(g_ptr + pid_b.to(tl.int64) * C + offs_c, g, mask=mask_c)


@triton.jit
def _whiten_kernel(g_ptr, w_ptr, part_ptr, ss_ptr, B, C, D, K_PER, stride_wd, stride_wc,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Partial g W^T over channels [k * K_PER, (k + 1) * K_PER) for a BLOCK_M x BLOCK_N tile, k = program_id(2).

    Writes part[k] (B x D) and, from the first column of tiles, the rows' partial sums of squares ss[k] (B);
    g: B x C fp32 contiguous, W: D x C. Splitting C keeps enough programs busy when B x D has few tiles.
    PRECISION: tl.dot's input_precision, "ieee" (exact fp32, FMA units) or "tf32x3" (three TF32 tensor-core
    products, near fp32).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(2) * K_PER
    mask_m = offs_m < B
    mask_n = offs_n < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER, C), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        g = tl.load(g_ptr + offs_m[:, None] * C + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wc + offs_n[None, :] * stride_wd,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision=PRECISION)
        sumsq += tl.sum(g * g, axis=1)
    split = tl.program_id(2).to(tl.int64)
    tl.store(part_ptr + split * B * D + offs_m[:, None] * D + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])
    if tl.program_id(1) == 0:
        tl.store(ss_ptr + split * B + offs_m, sumsq, mask=mask_m)


@triton.jit
def _finish_kernel(part_ptr, ss_ptr, b_ptr, out_ptr, B, N, SPLIT, l2_eps,
                   WHITENED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One output row: y = sum_k part[k, row] / max(||g_row||, eps) + b when WHITENED (the first L2 as a row
    scale, ||g||^2 = sum_k ss[k, row]), else y = part[0, row]; then out[row] = y / max(||y||, eps): `l2n`.

    Two passes over the row (norm, then store), each summing the SPLIT partials afresh: they are tiny.
    Deterministic: fixed summation order, no atomics.
    """
    row = tl.program_id(0)
    scale = 1.0
    if WHITENED:
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, SPLIT, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            ss += tl.load(ss_ptr + offs * B + row, mask=offs < SPLIT, other=0.0)
        scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(ss, axis=0)), l2_eps)
    base = row.to(tl.int64) * N
    sumsq = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        y = _finish_chunk(part_ptr, b_ptr, base, offs, offs < N, B * N, SPLIT, scale, HAS_BIAS, BLOCK)
        sumsq += y * y
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sumsq, axis=0)), l2_eps)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        y = _finish_chunk(part_ptr, b_ptr, base, offs, offs < N, B * N, SPLIT, scale, HAS_BIAS, BLOCK)
        tl.store(out_ptr + base + offs, y * inv, mask=offs < N)


@triton.jit
def _finish_chunk(part_ptr, b_ptr, base, offs, mask, split_stride, SPLIT, scale, HAS_BIAS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Columns `offs` of one row: its SPLIT partials summed, times `scale`, plus the bias (0 where masked)."""
    y = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, SPLIT):
        y += tl.load(part_ptr + k * split_stride + base + offs, mask=mask, other=0.0)
    y = y * scale
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, y, 0.0)


INTERPRETED = isinstance(_gem_kernel, InterpretedFunction)


# Tiles measured on an H200 (B=64, C=2048, 24x24; do_bench, 2026-11-28): channels_last maps read 64
# channels x 16 positions per step; NCHW maps 8 channels x 64 contiguous positions.
GEM_TILE_NHWC = (64, 16)
GEM_TILE_NCHW = (8, 64)
# Other tiles bench/bench_head.py times on channels_last maps (bf16 reads at 0.75 of the bound with the above).
GEM_TILE_CANDIDATES = ((128, 16), (128, 32), (256, 8))
# Whitening + finish at B = 64, C = D = 2048, fp32: 85.9 us with these, 90.5 with (32, 32, 64) and 512 programs,
# 152 us before the split of C. Exact fp32 ("ieee") runs on the FMA units: cuBLAS's fp32 GEMM alone takes 43 us.
WHITEN_TILE = (32, 64, 32)  # BLOCK_M (16 for B <= 16: tl.dot's minimum), BLOCK_N, BLOCK_K
WHITEN_PROGRAMS = 256  # split C until about this many programs run: B x D alone makes 64 tiles at B = 64
INTERPRETER_PROGRAMS = 8  # under the interpreter: still several splits, so the tests cover the summing


def gem_pool(x: torch.Tensor, p: torch.Tensor | float, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """GeM pooling on the Triton kernel.

    x: B x C x H x W, fp32/fp16/bf16, any strides; p: float or one-element tensor; tile: (BLOCK_C, BLOCK_S),
    powers of two (None: GEM_TILE_NHWC or GEM_TILE_NCHW by the layout; bench/bench_head.py tries others).
    Returns B x C float32 contiguous: (mean_hw max(x, 1e-6)^p)^(1/p).
    """
    B, C, H, Wd = x.shape
    g = torch.empty(B, C, device=x.device, dtype=torch.float32)
    if isinstance(p, torch.Tensor):
        p_ptr, p_val, from_ptr = p.detach().reshape(1).to(device=x.device, dtype=torch.float32), 0.0, True
    else:
        p_ptr, p_val, from_ptr = g, float(p), False  # p_ptr unused: any tensor fills the slot
    # Lay the tile's long side along the contiguous axis so loads coalesce.
    block_c, block_s = tile or (GEM_TILE_NHWC if x.stride(1) == 1 else GEM_TILE_NCHW)
    flat = H == 1 or x.stride(2) == Wd * x.stride(3)
    grid = (B, triton.cdiv(C, block_c))
    _gem_kernel[grid](x, g, p_ptr, p_val, C, H, Wd, *x.stride(), GEM_EPS,
                      P_FROM_PTR=from_ptr, FLAT_S=flat, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return g


def whiten_partials(g: torch.Tensor, W: torch.Tensor, programs: int,
                    precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Split-C partials of g W^T (SPLIT x B x D) and of the rows' sums of squares (SPLIT x B), float32.

    g: B x C float32 contiguous, W: D x C. C is split into chunks of whole BLOCK_K steps until the grid holds
    about `programs` programs. precision: "ieee" (the head's) or "tf32x3" (bench/bench_head.py's variant;
    Triton's interpreter computes both in plain fp32).
    """
    B, C = g.shape
    D = W.shape[0]
    bm, bn, bk = WHITEN_TILE
    bm = 16 if B <= 16 else bm
    tiles = triton.cdiv(B, bm) * triton.cdiv(D, bn)
    steps = triton.cdiv(C, bk)
    split = max(1, min(steps, programs // tiles))
    k_per = triton.cdiv(steps, split) * bk
    split = triton.cdiv(C, k_per)
    part = torch.empty(split, B, D, device=g.device, dtype=torch.float32)
    ss = torch.empty(split, B, device=g.device, dtype=torch.float32)
    grid = (triton.cdiv(B, bm), triton.cdiv(D, bn), split)
    _whiten_kernel[grid](g, W, part, ss, B, C, D, k_per, *W.stride(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         PRECISION=precision, num_warps=4)
    return part, ss


def finish(part: torch.Tensor, ss: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """The unit rows: L2(sum_k part[k] / max(||g||, eps) + b) with ss (the whitened head), L2(part[0]) without.

    part: SPLIT x B x N float32 contiguous; ss: SPLIT x B or None; b: N or None. Returns B x N float32.
    """
    split, B, N = part.shape
    out = torch.empty(B, N, device=part.device, dtype=torch.float32)
    _finish_kernel[(B,)](part, part if ss is None else ss, part if b is None else b, out, B, N, split, L2_EPS,
                         WHITENED=ss is not None, HAS_BIAS=b is not None, BLOCK=1024, num_warps=4)
    return out


def gem_whiten(
    x: torch.Tensor,
    p: torch.Tensor | float,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole head on Triton kernels (forward only; inputs already validated by `kernels.gem_whiten`).

    x: B x C x H x W fp32/fp16/bf16 (any strides); p: float or one-element tensor;
    W: D x C, b: D (optional; b only with W). Returns B x D float32 unit rows.
    """
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton head runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before kernels.triton_head is first imported, or use backend='torch'"
        )
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"the Triton head takes float32, float16 or bfloat16 maps, got {x.dtype}")
    g = gem_pool(x, p)
    if W is None:
        return finish(g[None], None, None)
    programs = INTERPRETER_PROGRAMS if INTERPRETED else WHITEN_PROGRAMS
    return finish(*whiten_partials(g, W, programs), b)
