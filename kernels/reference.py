"""Plain-torch reference of the descriptor head: the formula every other backend must match.

`l2n` is also the one L2 normalisation of the whole project (encoders, multi-scale descriptors,
training targets, whitening, relational losses).
"""
from __future__ import annotations

import numpy as np
import torch

GEM_EPS = 1e-6
# The floor under a norm in `l2n`: x / max(||x||, L2_EPS), as torch.nn.functional.normalize. Any row of a
# real descriptor is far longer, so it divides by its exact norm; an all-zero row stays zero instead of NaN.
L2_EPS = 1e-12


def l2n(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Rows of `x` scaled to unit L2 norm along the last axis: x / max(||x||, L2_EPS).

    x: ... x D torch tensor (differentiable, finite gradients everywhere) or numpy array (returned as one,
    computed by the same torch code); same shape and dtype out. Float32 or float64 (L2_EPS is below
    float16's range).
    """
    if isinstance(x, np.ndarray):
        return l2n(torch.from_numpy(x if x.flags.writeable else x.copy())).numpy()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(L2_EPS)


def gem(x: torch.Tensor, p: torch.Tensor | float, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling of a feature map.

    x: B x C x H x W (any memory format), p: scalar tensor or float.
    Returns B x C: (mean_hw clamp(x, eps)^p)^(1/p), computed in float32.
    """
    x = x.float().clamp(min=eps)
    p = torch.as_tensor(p, dtype=torch.float32, device=x.device)
    return x.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def gem_whiten(
    x: torch.Tensor,
    p: torch.Tensor | float,
    W: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """The descriptor head: GeM -> L2 -> [x W^T + b] -> L2.

    x: B x C x H x W feature map; W: D x C, b: D (both optional, together or W alone).
    Returns B x D float32 unit vectors (D = C without whitening).
    """
    v = l2n(gem(x, p))
    if W is not None:
        v = v @ W.float().t()
        if b is not None:
            v = v + b.float()
        v = l2n(v)
    return v
