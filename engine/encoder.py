"""The encoder as a network, and the record that describes a named one.

Encoder = trunk -> head; head = GeM(p) -> L2 -> [projection -> L2] -> [whitening -> L2]. The projection is
a linear layer inside the network: a student's map from its pooled features to its teacher's D (the
classifier bridge, see engine.models), or a cirtorch network's own trained FC layer. The whitening is a
learned Lw applied to the finished descriptor: for multi-scale descriptors it follows the combination of
the scales (engine.multiscale), as in cirtorch. `EncoderSpec` is the registry's record of a named encoder:
the family modules (engine.backbones, engine.cirtorch) declare their specs, engine.models collects them.
This module imports neither.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import kernels

from .images import DEFAULT_MAX_SIDE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- the spec record


@dataclass(frozen=True)
class Preprocessing:
    """What the trunk's weights expect: RGB in [0, 1] normalised by (x - mean) / std, at `max_side` pixels."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_side: int = DEFAULT_MAX_SIDE


@dataclass(frozen=True)
class WeightSource:
    """Where an encoder's weights come from.

    kind: "package" (a pip package that installs offline; `locate()` returns the installed file),
    "file" (a local file the user names with --weights), "cirtorch" (the cirtorch SfM-120k .pth,
    fetched by `engine data download NAME` from `url`, whose sha256 starts with `sha256_prefix`).
    detail: the package or file, in words.
    """

    kind: str
    detail: str
    locate: Callable[[], Path] | None = None
    url: str = ""
    sha256_prefix: str = ""

    @property
    def file(self) -> str:
        """The file name at `url` (cirtorch sources)."""
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class HeadSpec:
    """The head after the trunk: GeM with exponent `p` (learnable; its starting value, a cirtorch teacher's
    comes from its file), then L2, then the optional projection and whitening (see `Head`). whitening:
    what a teacher's whitening is ("" for none); projection: a student's projection maps it to its
    teacher's D (the classifier bridge, else drawn from a seed)."""

    p: float = 3.0
    whitening: str = ""
    projection: bool = False


@dataclass(frozen=True)
class EncoderSpec:
    """One named encoder of the registry.

    arch: the trunk's name as checkpoints record it (`config["arch"]`); trunk: builds the trunk from a
    weights file (None: random init); channels: what GeM pools (C); dim: a teacher's output D (None for a
    student: its teacher's D).
    """

    name: str
    role: str  # "teacher" or "student"
    arch: str
    trunk: Callable[[Path | None], nn.Module]
    channels: int
    weights: WeightSource
    preprocessing: Preprocessing
    head: HeadSpec
    dim: int | None
    description: str


# ---------------------------------------------------------------- the network


def _linear(W: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding copies of W (D' x D) and b (D')."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=True)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    return layer


class Head(nn.Module):
    """GeM(p) -> L2 -> [projection -> L2] -> [whitening -> L2]; owns p (learnable) and the two optional
    linear layers `project` and `whiten`.

    dim: the channels GeM pools; project_dim: the projection's output (None: no projection); whiten_dim:
    the whitening's output (None: no whitening), its input being the projection's output or `dim`.
    `pooled` is everything before the whitening (what each scale of a multi-scale descriptor runs),
    `whitening` the rest; `forward` is both. Without a projection the whole head is one fused
    `kernels.gem_whiten` call; with one, the projection is that call and the whitening a second layer.
    """

    def __init__(self, dim: int, p: float = 3.0, whiten_dim: int | None = None, project_dim: int | None = None):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.project = nn.Linear(dim, project_dim, bias=True) if project_dim else None
        self.whiten = nn.Linear(project_dim or dim, whiten_dim, bias=True) if whiten_dim else None

    def set_projection(self, W: torch.Tensor, b: torch.Tensor) -> None:
        """Install W (D' x C) and b (D') as the projection: a student's map to its teacher's D."""
        self.project = _linear(W, b)

    def set_whitening(self, W: torch.Tensor, b: torch.Tensor) -> None:
        """Install W (D' x D) and b (D') as the learned whitening, D the pooled (or projected) dimension."""
        self.whiten = _linear(W, b)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x h x w feature map -> B x D unit vectors: GeM -> L2 -> [projection -> L2]."""
        if self.project is None:
            return kernels.gem_whiten(x, self.p)
        return kernels.gem_whiten(x, self.p, self.project.weight, self.project.bias)

    def whitening(self, v: torch.Tensor) -> torch.Tensor:
        """B x D unit vectors -> B x D' unit vectors: L2(W v + b), or v itself without a whitening."""
        if self.whiten is None:
            return v
        return kernels.l2n(v @ self.whiten.weight.t() + self.whiten.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.project is None and self.whiten is not None:  # a teacher with Lw: one fused call
            return kernels.gem_whiten(x, self.p, self.whiten.weight, self.whiten.bias)
        return self.whitening(self.pooled(x))


class Encoder(nn.Module):
    """Images (B x 3 x H x W, RGB in [0, 1]) -> B x D float32 unit descriptors.

    `config` is the JSON-serialisable description that rebuilds it: name, arch, role, dim, pool_dim,
    space (the embedding-space id), teacher (for students), training config. mean / std: the input
    normalisation its trunk's weights expect (not saved: a checkpoint takes them from its arch's spec).
    """

    def __init__(self, trunk: nn.Module, head: Head, config: dict, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.config = dict(config)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        """Output dimension: the whitening's when the head has one, else the projection's, else what GeM pools."""
        if self.head.whiten is not None:
            return self.head.whiten.out_features
        return self.pooled_dim

    @property
    def pooled_dim(self) -> int:
        """The dimension before the whitening: the projection's output, else what GeM pools."""
        if self.head.project is not None:
            return self.head.project.out_features
        return int(self.config.get("pool_dim", self.config["dim"]))

    @property
    def space(self) -> str:
        return self.config["space"]

    @property
    def name(self) -> str:
        return self.config["name"]

    def trunk_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map of normalised images: B x C x h x w."""
        return self.trunk((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk_maps(images))

    def unwhitened(self) -> Encoder:
        """This encoder without its whitening, sharing its trunk and parameters (itself when it has none).

        Its space is the raw space the whitening was learned on: `config["raw_space"]` where the whitening
        was installed by this project, else the id of the remaining weights (a cirtorch teacher's Lw).
        It is what each scale of a multi-scale descriptor runs (engine.multiscale), and `raw:SOURCE`.
        """
        if self.head.whiten is None:
            return self
        head = Head(int(self.config.get("pool_dim", self.config["dim"])))
        head.p = self.head.p
        head.project = self.head.project
        config = {k: v for k, v in self.config.items() if k not in ("raw_space", "whitening")}
        raw = Encoder(self.trunk, head, config, tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))
        raw.train(self.training)
        raw.config["dim"] = raw.dim
        raw.config["space"] = self.config.get("raw_space") or space_id(raw)
        return raw


def weights_hash(module: nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes and bytes): the identity of a set of weights."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def space_id(encoder: Encoder) -> str:
    """A teacher's embedding-space id: its name and a hash of its weights and head (p, whitening)."""
    return f"{encoder.config['name']}:{weights_hash(encoder)[:16]}"
