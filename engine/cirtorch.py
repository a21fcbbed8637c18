"""Radenović's cirtorch SfM-120k teachers: their .pth files, loaded into our Encoder with their learned whitening.

A cirtorch checkpoint is `{'state_dict': {'features.*', 'pool.p', ['whiten.*']}, 'meta': {'architecture',
'pooling', 'whitening', 'outputdim', 'mean', 'std', 'Lw': {'retrieval-SfM-120k': {'ss'|'ms': {'m', 'P'}}}}}`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EngineError

BASE_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
# The hex tail of each file name is the prefix of its sha256 (the torch.hub convention cirtorch follows).
CIRTORCH_TEACHERS = {
    "resnet101-gem": {"file": "retrievalSfM120k-resnet101-gem-b80fb85.pth", "arch": "resnet101", "sha256_prefix": "b80fb85"},
    "vgg16-gem": {"file": "retrievalSfM120k-vgg16-gem-b4dcdc6.pth", "arch": "vgg16", "sha256_prefix": "b4dcdc6"},
}
ARCH_TO_NAME = {v["arch"]: k for k, v in CIRTORCH_TEACHERS.items()}


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


def load_cirtorch_teacher(path: Path, name: str | None = None, lw: str = "ss"):
    """Encoder from a cirtorch .pth: trunk + GeM p, plus `meta['Lw']['retrieval-SfM-120k'][lw]` as whitening.

    lw: "ss" (single-scale whitening), "ms" (multi-scale), or "none".
    """
    import torch

    from .models import ARCHS, Encoder, Head

    path = Path(path)
    if not path.exists():
        raise EngineError("cirtorch checkpoint not found", path)
    ckpt = _torch_load_cirtorch(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise EngineError("not a cirtorch checkpoint (no 'state_dict' and 'meta')", path)
    meta = ckpt["meta"]
    arch_name = meta.get("architecture")
    if arch_name not in ARCH_TO_NAME:
        raise EngineError(f"cirtorch architecture {arch_name!r} is not supported (known: {', '.join(ARCH_TO_NAME)})", path)
    if meta.get("pooling") != "gem":
        raise EngineError(f"cirtorch pooling {meta.get('pooling')!r} is not GeM", path)
    name = name or ARCH_TO_NAME[arch_name]
    arch = ARCHS[arch_name]
    trunk = arch.make(None)
    state = ckpt["state_dict"]
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing, unexpected = trunk.load_state_dict(features, strict=False)
    if missing or unexpected:
        raise EngineError(f"cirtorch features do not fit {arch_name}: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
    head = Head(arch.channels)
    with torch.no_grad():
        head.p.copy_(torch.as_tensor(state["pool.p"]).reshape(1))
    if meta.get("whitening") and "whiten.weight" in state:
        head.set_whitening(state["whiten.weight"], state["whiten.bias"])
    elif lw != "none":
        Lw = meta.get("Lw", {}).get("retrieval-SfM-120k", {}).get(lw)
        if Lw is None:
            raise EngineError(f"checkpoint has no meta['Lw']['retrieval-SfM-120k'][{lw!r}]", path)
        P = torch.as_tensor(np.asarray(Lw["P"]), dtype=torch.float32)
        m = torch.as_tensor(np.asarray(Lw["m"]), dtype=torch.float32).reshape(-1)
        head.set_whitening(P, -(P @ m))
    config = {"name": name, "arch": arch_name, "role": "teacher", "dim": head.whiten.out_features if head.whiten is not None else arch.channels,
              "pool_dim": arch.channels,
              "space": "", "lw": lw, "source": path.name}
    enc = Encoder(trunk, head, config)
    enc.mean.copy_(torch.tensor(meta.get("mean", arch.mean)).view(1, 3, 1, 1))
    enc.std.copy_(torch.tensor(meta.get("std", arch.std)).view(1, 3, 1, 1))
    return enc.eval()
