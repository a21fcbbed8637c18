"""Radenović's cirtorch SfM-120k teachers: their registry entries, and their .pth files read into our Encoder.

A cirtorch checkpoint is `{'state_dict': {'features.*', 'pool.p', ['whiten.*']}, 'meta': {'architecture',
'pooling', 'whitening', 'outputdim', 'mean', 'std', 'Lw': {'retrieval-SfM-120k': {'ss'|'ms': {'m', 'P'}}}}}`.
The head is GeM with the file's learned p, then the network's own trained `whiten` layer when it has one
(the "-w" networks: a layer inside the network, run at every scale, so it sits in the head's projection
slot), else the learned whitening `meta['Lw']` (x -> P (x - m)), applied to the finished descriptor, after
the scales are combined (cirtorch's `extract_ms`, then `whitenapply`): "ss" for single-scale, "ms" for
multi-scale descriptors.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from .backbones import IMAGENET, torchvision_trunk
from .encoder import Encoder, EncoderSpec, Head, HeadSpec, WeightSource, space_id
from .errors import EngineError

BASE_URL = "https://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
LW_KEY = "retrieval-SfM-120k"
_WHITENING = "cirtorch Lw learned on SfM-120k (meta['Lw'], single-scale)"


def _spec(name: str, arch: str, channels: int, file: str, sha256_prefix: str, title: str) -> EncoderSpec:
    # The hex tail of each file name is the prefix of its sha256 (the torch.hub convention cirtorch follows).
    source = WeightSource("cirtorch", f"cirtorch {file} (`engine data download {name}`, then --weights PATH)",
                          url=BASE_URL + file, sha256_prefix=sha256_prefix)
    return EncoderSpec(name, "teacher", arch, partial(torchvision_trunk, arch), channels, source, IMAGENET,
                       HeadSpec(whitening=_WHITENING), channels,
                       f"{title} + GeM fine-tuned on SfM-120k, with its learned whitening (cirtorch)")


SPECS = [
    _spec("resnet101-gem", "resnet101", 2048, "retrievalSfM120k-resnet101-gem-b80fb85.pth", "b80fb85", "ResNet-101"),
    _spec("vgg16-gem", "vgg16", 512, "retrievalSfM120k-vgg16-gem-b4dcdc6.pth", "b4dcdc6", "VGG16"),
]
# The download table's view of the same entries (engine.datasets.download).
CIRTORCH_TEACHERS = {s.name: {"file": s.weights.file, "arch": s.arch, "sha256_prefix": s.weights.sha256_prefix} for s in SPECS}
_BY_ARCH = {s.arch: s for s in SPECS}


def _torch_load_cirtorch(path: Path) -> dict:
    """torch.load with numpy's array types allowed (cirtorch pickles Lw as numpy arrays), nothing else."""
    import torch

    safe = [np.ndarray, np.dtype, np._core.multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in ("float32", "float64", "int64")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EngineError(f"cannot read cirtorch checkpoint ({type(e).__name__}: {e})".splitlines()[0], path) from None


def load_teacher(path: str | Path, name: str | None = None, lw: str = "ss") -> Encoder:
    """A teacher Encoder from a cirtorch .pth: trunk + GeM p, plus its whitening; eval mode, with its space id.

    name: the registry name it must be (None: the one of its architecture); lw: which `meta['Lw']` to use
    when the network has no whitening layer: "ss" (single-scale), "ms" (multi-scale) or "none".
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise EngineError("cirtorch checkpoint not found", path)
    ckpt = _torch_load_cirtorch(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise EngineError("not a cirtorch checkpoint (no 'state_dict' and 'meta')", path)
    meta = ckpt["meta"]
    spec = _BY_ARCH.get(meta.get("architecture"))
    if spec is None:
        raise EngineError(f"cirtorch architecture {meta.get('architecture')!r} is not supported (known: {', '.join(_BY_ARCH)})", path)
    if name is not None and name != spec.name:
        raise EngineError(f"this file holds cirtorch's {spec.arch} network ({spec.name}), not {name}", path)
    if meta.get("pooling") != "gem":
        raise EngineError(f"cirtorch pooling {meta.get('pooling')!r} is not GeM", path)
    trunk = spec.trunk(None)
    state = ckpt["state_dict"]
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing, unexpected = trunk.load_state_dict(features, strict=False)
    if missing or unexpected:
        raise EngineError(f"cirtorch features do not fit {spec.arch}: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
    head = Head(spec.channels)
    with torch.no_grad():
        head.p.copy_(torch.as_tensor(state["pool.p"]).reshape(1))
    if meta.get("whitening") and "whiten.weight" in state:
        head.set_projection(state["whiten.weight"], state["whiten.bias"])
    elif lw != "none":
        Lw = meta.get("Lw", {}).get(LW_KEY, {}).get(lw)
        if Lw is None:
            raise EngineError(f"checkpoint has no meta['Lw'][{LW_KEY!r}][{lw!r}]", path)
        P = torch.as_tensor(np.asarray(Lw["P"]), dtype=torch.float32)
        m = torch.as_tensor(np.asarray(Lw["m"]), dtype=torch.float32).reshape(-1)
        head.set_whitening(P, -(P @ m))
    config = {"name": name or spec.name, "arch": spec.arch, "role": "teacher",
              "dim": spec.channels, "pool_dim": spec.channels,
              "space": "", "lw": lw, "source": path.name}
    mean, std = meta.get("mean", spec.preprocessing.mean), meta.get("std", spec.preprocessing.std)
    enc = Encoder(trunk, head, config, tuple(mean), tuple(std)).eval()
    enc.config["dim"] = enc.dim
    enc.config["space"] = space_id(enc)
    return enc
