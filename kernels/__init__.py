"""The descriptor head as functions: GeM pooling, L2 normalisation and whitening.

`gem_whiten` is the one entry point the encoders call. On CUDA tensors it runs a
fused Triton kernel where one is available; elsewhere the torch reference, which
gives the same numbers.
"""
from __future__ import annotations

import torch

from .reference import GEM_EPS, gem, l2n
from .reference import gem_whiten as gem_whiten_reference

__all__ = ["GEM_EPS", "gem", "gem_whiten", "gem_whiten_reference", "l2n"]


def gem_whiten(
    x: torch.Tensor,
    p: torch.Tensor | float,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """GeM -> L2 -> [whitening x W^T + b] -> L2 over a B x C x H x W feature map; returns B x D float32.

    backend: "auto" (Triton on CUDA tensors when available, else torch), "torch", or "triton".
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown head backend {backend!r}: expected auto, torch or triton")
    if backend == "triton":
        raise NotImplementedError("the Triton head kernel is not built yet; use backend='torch'")
    return gem_whiten_reference(x, p, W, b)
