"""Plain-torch reference of the descriptor head: the formula every other backend must match."""
from __future__ import annotations

import torch

GEM_EPS = 1e-6
L2_EPS = 1e-6


def l2n(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """L2-normalise the rows of `x` (B x D); `eps` keeps an all-zero row finite."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


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
