"""The descriptor head as functions: GeM pooling, L2 normalisation (`l2n`, the project's one) and the
head's linear layer (a teacher's whitening, or a student's map to its teacher's D).

`gem_whiten` is the one entry point the encoders call. On CUDA tensors it runs a
fused Triton kernel (kernels/triton_head.py) where Triton imports; elsewhere the
torch reference (kernels/reference.py), which gives the same numbers. Triton is
imported lazily, so this package works without it.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from .reference import GEM_EPS, L2_EPS, gem, l2n
from .reference import gem_whiten as gem_whiten_reference

__all__ = ["BACKENDS", "GEM_EPS", "L2_EPS", "gem", "gem_whiten", "gem_whiten_reference", "l2n", "triton_available"]

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the `triton` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _needs_grad(*tensors: object) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_inputs(x: torch.Tensor, p: torch.Tensor | float, W: torch.Tensor | None, b: torch.Tensor | None) -> None:
    if x.dim() != 4 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"gem_whiten: x must be B x C x H x W with H, W > 0, got shape {tuple(x.shape)}")
    if isinstance(p, torch.Tensor) and p.numel() != 1:
        raise ValueError(f"gem_whiten: p must be a float or a one-element tensor, got shape {tuple(p.shape)}")
    if W is None:
        if b is not None:
            raise ValueError("gem_whiten: a bias b needs a whitening matrix W")
        return
    if W.dim() != 2 or W.shape[1] != x.shape[1]:
        raise ValueError(f"gem_whiten: W must be D x C with C = {x.shape[1]}, got shape {tuple(W.shape)}")
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"gem_whiten: b must have shape ({W.shape[0]},), got {tuple(b.shape)}")
    for name, t in (("W", W), ("b", b)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gem_whiten: {name} is on {t.device} but x is on {x.device}")


def gem_whiten(
    x: torch.Tensor,
    p: torch.Tensor | float,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GeM -> L2 -> [whitening x W^T + b] -> L2 over a B x C x H x W feature map; returns B x D float32.

    x: fp32/fp16/bf16, NCHW or channels_last; p: float or one-element tensor (learnable);
    W: D x C and b: D, both optional (b only with W); D = C without W.
    backend: "auto" (Triton on CUDA tensors when Triton is installed, else torch), "torch", or
    "triton" (on CPU tensors only under TRITON_INTERPRET=1, see kernels/triton_head.py).

    Gradients: the Triton kernels are forward only. When autograd is recording and any of
    x, p, W, b requires grad, "auto" runs the torch reference, whose backward gives the
    gradients of the very same formula; "triton" refuses. Why no Triton backward: training
    spends its time in the backbone, the head's backward is a few elementwise passes that
    torch already fuses well, and one reference backward is one formula to trust.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown head backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    _check_inputs(x, p, W, b)
    needs_grad = _needs_grad(x, p, W, b)
    if backend == "torch" or (backend == "auto" and (needs_grad or not x.is_cuda or not triton_available())):
        return gem_whiten_reference(x, p, W, b)
    if needs_grad:
        raise ValueError("the Triton head is forward only: use backend='auto' or 'torch' when gradients are needed")
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    from . import triton_head

    return triton_head.gem_whiten(x, p, W, b)
