"""The descriptor head as Triton kernels: GeM -> L2 -> [x W^T + b] -> L2, forward only.

Three launches, chosen for B=64, C=2048, 24x24, D=2048 on an H100/H200:
1. `_gem_kernel`, grid (B, C / BLOCK_C): reads the feature map exactly once (the
   only large read: 302 MB in fp32, 151 MB in bf16) and writes the pooled B x C
   means. Splitting over channel blocks gives B * C / BLOCK_C = 4096-8192 programs,
   enough to saturate HBM; a kernel fusing the whole head per image would have
   only B = 64 programs (under half the 132 SMs) or need a grid-wide sync.
2. `_whiten_kernel`, grid (B / BLOCK_M, D / BLOCK_N): the first L2 is a per-row
   scale, so it is folded into the GEMM epilogue (the row's sum of squares is
   accumulated from the same g tiles the K loop loads anyway), plus the bias.
   fp32 "ieee" dot: TF32 would miss the 1e-5 agreement with the reference, and
   this 0.5 GFLOP GEMM over 16 MB of W is small beside the map read.
3. `_l2n_kernel`, one program per row: the final L2 (or the only one without W).
   Deterministic (no atomics), and it reads/writes B x D floats (0.5 MB).

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
             CUBE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sum over the S = H * Wd spatial positions of max(x, eps)^p for BLOCK_C channels."""
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
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
                P_FROM_PTR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
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
        total = _gem_sum(base, mask_c, S, Wd, stride_h, stride_w, eps, p, True, BLOCK_C, BLOCK_S)
    else:
        total = _gem_sum(base, mask_c, S, Wd, stride_h, stride_w, eps, p, False, BLOCK_C, BLOCK_S)
    # Masked lanes pool nothing; 1.0 keeps their log2 finite (they are not stored).
    g = tl.exp2(tl.log2(tl.where(mask_c, total / S, 1.0)) / p)
    tl.store(g_ptr + pid_b.to(tl.int64) * C + offs_c, g, mask=mask_c)


@triton.jit
def _whiten_kernel(g_ptr, w_ptr, b_ptr, y_ptr, B, C, D, stride_wd, stride_wc, l2_eps,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """y = L2(g) W^T + b for a BLOCK_M x BLOCK_N tile; g: B x C fp32 contiguous, W: D x C."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < B
    mask_n = offs_n < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        g = tl.load(g_ptr + offs_m[:, None] * C + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wc + offs_n[None, :] * stride_wd,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g, w, acc, input_precision="ieee")
        sumsq += tl.sum(g * g, axis=1)
    y = acc * (1.0 / (tl.sqrt(sumsq) + l2_eps))[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * D + offs_n[None, :], y,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _l2n_kernel(y_ptr, out_ptr, N, l2_eps, BLOCK: tl.constexpr):
    """out[row] = y[row] / (||y[row]|| + eps) for one row of a contiguous fp32 matrix."""
    row = tl.program_id(0).to(tl.int64) * N
    sumsq = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(y_ptr + row + offs, mask=offs < N, other=0.0)
        sumsq += v * v
    inv = 1.0 / (tl.sqrt(tl.sum(sumsq, axis=0)) + l2_eps)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        v = tl.load(y_ptr + row + offs, mask=offs < N, other=0.0)
        tl.store(out_ptr + row + offs, v * inv, mask=offs < N)


INTERPRETED = isinstance(_gem_kernel, InterpretedFunction)


def gem_pool(x: torch.Tensor, p: torch.Tensor | float) -> torch.Tensor:
    """GeM pooling on the Triton kernel.

    x: B x C x H x W, fp32/fp16/bf16, any strides; p: float or one-element tensor.
    Returns B x C float32 contiguous: (mean_hw max(x, 1e-6)^p)^(1/p).
    """
    B, C, H, Wd = x.shape
    g = torch.empty(B, C, device=x.device, dtype=torch.float32)
    if isinstance(p, torch.Tensor):
        p_ptr, p_val, from_ptr = p.detach().reshape(1).to(device=x.device, dtype=torch.float32), 0.0, True
    else:
        p_ptr, p_val, from_ptr = g, float(p), False  # p_ptr unused: any tensor fills the slot
    # Lay the tile's long side along the contiguous axis so loads coalesce.
    block_c, block_s = (64, 32) if x.stride(1) == 1 else (16, 64)
    grid = (B, triton.cdiv(C, block_c))
    _gem_kernel[grid](x, g, p_ptr, p_val, C, H, Wd, *x.stride(), GEM_EPS,
                      P_FROM_PTR=from_ptr, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)
    return g


def l2n_rows(y: torch.Tensor) -> torch.Tensor:
    """Row-wise y / (||y|| + 1e-6) of a contiguous B x N float32 matrix; returns a new B x N float32."""
    out = torch.empty_like(y)
    _l2n_kernel[(y.shape[0],)](y, out, y.shape[1], L2_EPS, BLOCK=1024, num_warps=4)
    return out


def whiten(g: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """L2(g) W^T + b (not yet normalised); g: B x C float32 contiguous, W: D x C, b: D or None.

    Returns B x D float32.
    """
    B, C = g.shape
    D = W.shape[0]
    y = torch.empty(B, D, device=g.device, dtype=torch.float32)
    # BLOCK_M 16 (tl.dot's minimum) keeps B=64 x D=2048 at 256 programs rather than 32.
    grid = (triton.cdiv(B, 16), triton.cdiv(D, 32))
    _whiten_kernel[grid](g, W, y if b is None else b, y, B, C, D, *W.stride(), L2_EPS,
                         HAS_BIAS=b is not None, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4)
    return y


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
    return l2n_rows(g if W is None else whiten(g, W, b))
