"""Descriptors of a batch of images at one or several scales, as cirtorch computes them.

cirtorch's `extract_ms` runs the network at each scale (the image resized by bilinear interpolation),
combines the per-scale vectors by a power mean and L2-normalises; a learned whitening (`whitenapply`,
x -> L2(P (x - m))) is applied to that finished vector, never inside a scale. Here the network run at
each scale is the encoder up to its whitening (`scale_network`), and the head's whitening follows the
combination. The power is the GeM exponent p when the per-scale vectors are GeM's own output; 1 when a
projection follows GeM (its outputs are signed), as cirtorch takes 1 for a network with its own FC layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import l2n

from .backends import Runner
from .encoder import Encoder

# METHOD.md's test-time scales: 1, 1/sqrt(2), 1/2 (cirtorch's and AML's '[1, 1/2**(1/2), 1/2]').
PROTOCOL_SCALES = (1.0, 2**-0.5, 0.5)


def single_pass(scales: Sequence[float]) -> bool:
    """True when `scales` is the plain single-scale descriptor: one pass of the whole encoder."""
    return len(scales) == 1 and scales[0] == 1.0


def scale_network(encoder: Encoder, scales: Sequence[float]) -> Encoder:
    """The network `describe` runs at each scale: the encoder itself for a single pass, else the encoder
    without its whitening (`Encoder.unwhitened`), which follows the combination of the scales.
    A runner handed to `describe` must run this network (engine.backends.make_runner(scale_network(...)))."""
    return encoder if single_pass(scales) else encoder.unwhitened()


def scale_power(encoder: Encoder) -> float:
    """The exponent of the power mean over scales: GeM's p, or 1 when a projection follows GeM."""
    return 1.0 if encoder.head.project is not None else float(encoder.head.p)


@torch.no_grad()
def describe(encoder: Encoder, images: torch.Tensor, scales: Sequence[float] = (1.0,), runner: Runner | None = None) -> torch.Tensor:
    """Descriptors of a batch of same-sized images (B x 3 x H x W float32 in [0, 1]) -> B x D float32 unit rows.

    Several scales: v = L2((1/|S| sum_s f(resize(x, s))^p)^(1/p)) with f = `scale_network(encoder, scales)` and
    p = `scale_power(encoder)`, then the encoder's whitening (if any): L2(W v + b).
    runner: what runs `scale_network(encoder, scales)` (engine.backends.make_runner); None: that network itself.
    """
    if single_pass(scales):
        return (encoder if runner is None else runner)(images)
    run = (lambda x: encoder.head.pooled(encoder.trunk_maps(x))) if runner is None else runner  # = scale_network
    p = scale_power(encoder)
    acc = None
    for s in scales:
        x = images if s == 1.0 else torch.nn.functional.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        v = run(x) if p == 1.0 else run(x).clamp(min=0).pow(p)
        acc = v if acc is None else acc + v
    acc = acc / len(scales)
    v = l2n(acc if p == 1.0 else acc.pow(1.0 / p))
    if encoder.head.whiten is not None:
        encoder.head.whiten.to(v.device)  # the runner may hold the rest of the network on another device
    return encoder.head.whitening(v)
