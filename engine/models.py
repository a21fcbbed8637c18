"""The encoder registry: one record per named encoder, one constructor, checkpoints, and named sources.

Teachers and students alike are `EncoderSpec` records (engine.encoder) that their family modules declare:
engine.backbones (the ImageNet trunks of timm and torchvision: the offline teacher and the students) and
engine.cirtorch (the cirtorch SfM-120k teachers). This module collects them into `ENCODERS` and builds
any of them with `build(name, ...)`, as timm's `create_model` does over its registered configs; the
family modules never import this one.

A teacher is trunk -> GeM -> L2 [-> learned whitening -> L2]; its embedding-space id is its name and a
hash of its weights and head. A student is trunk -> GeM -> L2 -> projection to its teacher's D -> L2
[-> whitening -> L2]; the projection starts as `classifier_bridge` (through the two ImageNet classifiers),
so an untrained student already lands near its teacher's space, and the student carries the id of the
teacher space it maps into. A whitening on a student is its teacher's Lw (the paper's test-time
whitening: the student learns the teacher's raw space, both sides are whitened afterwards) or its own.

Checkpoints are one .safetensors file whose header metadata holds the JSON config. `load_encoder(source)`
takes a registry name, `checkpoint:PATH`, `cirtorch:PATH` (its single-scale Lw), `cirtorch-ms:PATH` (its
multi-scale Lw, for descriptors at several scales), or a plain PATH whose kind is read from the
file's first bytes (never from its suffix); `raw:SOURCE` is that encoder without its whitening, in the
raw space its whitening was learned on (a space of its own: its vectors never mix with whitened ones).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import backbones, cirtorch
from .backbones import file_format, imagenet_classifier, timm_classifier
from .encoder import Encoder, EncoderSpec, Head, space_id, weights_hash
from .errors import EngineError
from .files import written_by

__all__ = [
    "ENCODERS", "STUDENTS", "TEACHERS", "Encoder", "EncoderSpec", "Head", "build", "build_student", "build_teacher",
    "classifier_bridge", "describe_registry", "load_checkpoint", "load_encoder",
    "parse_source", "read_checkpoint_config", "registry_teacher_of", "save_checkpoint", "space_id", "weights_hash",
]

HEAD_SEED = 0  # a student head without a classifier bridge is drawn from this seed: same name, same encoder
CHECKPOINT_KEY = "aml_engine"
# the prefixes of an explicit source, "KIND:PATH"; a cirtorch file's learned whitening (meta['Lw']) is the
# single-scale one under "cirtorch", the multi-scale one under "cirtorch-ms" (cirtorch's 'ss' / 'ms')
CIRTORCH_LW = {"cirtorch": "ss", "cirtorch-ms": "ms"}
SOURCE_KINDS = ("checkpoint", *CIRTORCH_LW)
RAW = "raw:"  # "raw:SOURCE": the encoder of SOURCE without its whitening (Encoder.unwhitened)

ENCODERS: dict[str, EncoderSpec] = {s.name: s for s in [*backbones.SPECS, *cirtorch.SPECS]}
TEACHERS = tuple(n for n, s in ENCODERS.items() if s.role == "teacher")
STUDENTS = tuple(n for n, s in ENCODERS.items() if s.role == "student")
_BY_ARCH = {s.arch: s for s in ENCODERS.values()}  # checkpoints name their trunk by arch


# ---------------------------------------------------------------- the constructor


def _resolve_weights(spec: EncoderSpec, weights: str | Path | None) -> Path | None:
    """None -> the packaged ImageNet weights (an error if there are none); "random" -> no weights; else the path."""
    if weights == "random":
        return None
    if weights is not None:
        return Path(weights)
    if spec.weights.kind != "package":
        raise EngineError(
            f"{spec.name} has no ImageNet weights that install offline: pass weights=PATH (--weights) "
            "or weights='random' to ask for a random init explicitly"
        )
    return spec.weights.locate()


def classifier_bridge(student_fc: torch.Tensor | None, teacher: Encoder) -> torch.Tensor | None:
    """D x C map from a student's pooled features to the teacher's, through the shared ImageNet label space.

    Both classifiers read class scores linearly from pooled features: W_t f_t ~ W_s f_s gives
    f_t ~ pinv(W_t) W_s f_s. None when either side has no ImageNet classifier or the teacher's
    output is not its pooled features (a projection or a whitening follows them).
    """
    teacher_fc = timm_classifier(teacher.trunk)
    linear = teacher.head.project is not None or teacher.head.whiten is not None
    if student_fc is None or teacher_fc is None or linear or teacher_fc.shape[0] != student_fc.shape[0]:
        return None
    return (torch.linalg.pinv(teacher_fc.double()) @ student_fc.double()).float()


def _build_teacher(spec: EncoderSpec, weights: str | Path | None) -> Encoder:
    if spec.weights.kind == "cirtorch":
        if weights in (None, "random"):
            raise EngineError(
                f"{spec.name} needs its checkpoint: pass weights=PATH (get it with `engine data download {spec.name}`; "
                f"file {spec.weights.file})"
            )
        return cirtorch.load_teacher(weights, spec.name)
    trunk = spec.trunk(_resolve_weights(spec, weights))
    config = {"name": spec.name, "arch": spec.arch, "role": "teacher", "dim": spec.channels, "pool_dim": spec.channels, "space": ""}
    enc = Encoder(trunk, Head(spec.channels, spec.head.p), config, spec.preprocessing.mean, spec.preprocessing.std).eval()
    enc.config["space"] = space_id(enc)
    return enc


def _build_student(
    spec: EncoderSpec, weights: str | Path | None, dim: int, space: str, teacher: str, bridge_to: Encoder | None, seed: int
) -> Encoder:
    path = _resolve_weights(spec, weights)
    trunk = spec.trunk(path)
    bridge = classifier_bridge(imagenet_classifier(trunk, path), bridge_to) if bridge_to is not None else None
    if bridge is not None and bridge.shape[0] != dim:
        raise EngineError(f"the teacher's classifier bridge gives D = {bridge.shape[0]}, the student is asked for D = {dim}")
    if bridge is None:
        W = torch.randn(dim, spec.channels, generator=torch.Generator().manual_seed(seed)) / spec.channels**0.5
    else:
        W = bridge
    config = {
        "name": f"{spec.name}->{teacher or space}",
        "arch": spec.arch,
        "role": "student",
        "dim": int(dim),
        "pool_dim": spec.channels,
        "space": space,
        "teacher": teacher,
        "head_init": f"random:{seed}" if bridge is None else "imagenet-bridge",
    }
    head = Head(spec.channels, spec.head.p)
    head.set_projection(W, torch.zeros(dim))
    return Encoder(trunk, head, config, spec.preprocessing.mean, spec.preprocessing.std).eval()


def build(
    name: str,
    weights: str | Path | None = None,
    *,
    dim: int | None = None,
    space: str | None = None,
    teacher: str = "",
    bridge_to: Encoder | None = None,
    seed: int = HEAD_SEED,
) -> Encoder:
    """The registry encoder `name`, in eval mode.

    weights: None (the packaged ImageNet weights; an error when there are none), "random", or a file
    (a cirtorch teacher's .pth). A teacher gets its space id from its weights and head.
    A student needs its target: dim (the teacher's D) and space (the teacher's space id); teacher names it
    in the student's name; its linear map starts as the classifier bridge to `bridge_to` (the teacher
    encoder) where both have ImageNet classifiers, else it is drawn from `seed`.
    """
    spec = ENCODERS.get(name)
    if spec is None:
        raise EngineError(f"unknown encoder {name!r}: known are {', '.join(ENCODERS)}")
    if spec.role == "teacher":
        if dim is not None or space is not None or bridge_to is not None:
            raise EngineError(f"{name} is a teacher: it has its own space and D, it takes no target")
        return _build_teacher(spec, weights)
    if dim is None or space is None:
        raise EngineError(f"{name} is a student architecture: an untrained student needs a target space (--target STORE)")
    return _build_student(spec, weights, dim, space, teacher, bridge_to, seed)


def build_teacher(name: str, weights: str | Path | None = None) -> Encoder:
    """`build` for a teacher name only: `effnet-lite2-gem` uses packaged weights; the cirtorch ones need their .pth."""
    if name not in TEACHERS:
        raise EngineError(f"unknown teacher {name!r}: known teachers are {', '.join(TEACHERS)}")
    return build(name, weights)


def build_student(
    name: str, dim: int, space: str, weights: str | Path | None = None, seed: int = HEAD_SEED, teacher: str = "",
    bridge_to: Encoder | None = None,
) -> Encoder:
    """`build` for a student name only: an untrained student in teacher `space` with output `dim`."""
    if name not in STUDENTS:
        raise EngineError(f"unknown student {name!r}: known students are {', '.join(STUDENTS)}")
    return build(name, weights, dim=dim, space=space, teacher=teacher, bridge_to=bridge_to, seed=seed)


def registry_teacher_of(space: str) -> Encoder | None:
    """The registry teacher whose packaged weights make this space id, if it is one (the store's encoder), else None."""
    name = space.split(":", 1)[0]
    if name not in TEACHERS:
        return None
    try:
        teacher = build(name)
    except EngineError:  # its weights are not installed (the cirtorch teachers)
        return None
    return teacher if teacher.space == space else None


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(encoder: Encoder, path: str | Path, extra: dict | None = None) -> Path:
    """One .safetensors file, written into place: the state dict, with the encoder's config (+ `extra`) as JSON in its header."""
    path = Path(path)
    config = dict(encoder.config)
    config["dim"] = encoder.dim
    config["project_dim"] = encoder.head.project.out_features if encoder.head.project is not None else None
    config["whiten_dim"] = encoder.head.whiten.out_features if encoder.head.whiten is not None else None
    config.update(extra or {})
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with written_by(path) as tmp:
        save_file(state, str(tmp), metadata={CHECKPOINT_KEY: json.dumps(config)})
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    """The JSON config in a checkpoint's header; an EngineError naming the file if it is not one."""
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
    """Rebuild an encoder from its checkpoint: the trunk of the config's arch, its head, the saved weights; eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_checkpoint_config(path)
    spec = _BY_ARCH.get(config.get("arch", ""))
    if spec is None:
        raise EngineError(f"checkpoint names unknown architecture {config.get('arch')!r}", path)
    pool_dim = config.get("pool_dim", config["dim"])  # what GeM pools; dim is the output, after any linear layer
    state = load_file(str(path))
    if "project_dim" not in config and config.get("role") == "student":
        # Written before the head had a projection slot: a student's map sat in the whitening's (and a
        # student could not be whitened then), so the layer is its projection.
        config["project_dim"], config["whiten_dim"] = config.get("whiten_dim"), None
        state = {k.replace("head.whiten.", "head.project.", 1): v for k, v in state.items()}
    head = Head(pool_dim, whiten_dim=config.get("whiten_dim"), project_dim=config.get("project_dim"))
    enc = Encoder(spec.trunk(None), head, config, spec.preprocessing.mean, spec.preprocessing.std)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EngineError(f"checkpoint does not fit {spec.arch}: missing {missing[:3]}, unexpected {unexpected[:3]}", path)
    return enc.eval()



# ---------------------------------------------------------------- named sources


class Source(NamedTuple):
    """Where an encoder comes from: kind "registry" (ref: a name), "checkpoint", "cirtorch" or "cirtorch-ms"
    (ref: a path)."""

    kind: str
    ref: str


def parse_source(source: str | Path) -> Source:
    """A registry name, "checkpoint:PATH", "cirtorch:PATH", "cirtorch-ms:PATH", or a plain PATH (safetensors ->
    checkpoint, torch's format -> cirtorch, told by `backbones.file_format`); anything else is an EngineError."""
    text = str(source)
    if not isinstance(source, Path):
        if text in ENCODERS:
            return Source("registry", text)
        kind, sep, rest = text.partition(":")
        if sep and kind in SOURCE_KINDS:
            return Source(kind, rest)
    if not Path(text).exists():
        raise EngineError(
            f"unknown model {text!r}: not a registry encoder ({', '.join(ENCODERS)}) and no such file; "
            f"name a file as checkpoint:PATH, cirtorch:PATH or cirtorch-ms:PATH"
        )
    return Source("checkpoint" if file_format(Path(text)) == "safetensors" else "cirtorch", text)


def load_encoder(source: str | Path, weights: str | Path | None = None) -> Encoder:
    """An encoder from a source (see `parse_source`): a registry teacher (with `weights` for its backbone),
    a checkpoint, or a cirtorch teacher file (`cirtorch-ms:PATH`: with its multi-scale Lw); `raw:SOURCE` is
    SOURCE's encoder without its whitening (`Encoder.unwhitened`: the raw space, e.g. the targets of the paper's
    test-time whitening). A registry student needs a target: `build` it instead."""
    if not isinstance(source, Path) and str(source).startswith(RAW):
        inner = str(source)[len(RAW):]
        encoder = load_encoder(inner, weights)
        if encoder.head.whiten is None:
            raise EngineError(f"{inner!r} has no whitening: raw:SOURCE names the space before an encoder's whitening")
        return encoder.unwhitened()
    src = parse_source(source)
    if src.kind == "checkpoint":
        return load_checkpoint(src.ref)
    if src.kind in CIRTORCH_LW:
        return cirtorch.load_teacher(src.ref, lw=CIRTORCH_LW[src.kind])
    return build(src.ref, weights)


def describe_registry() -> list[dict]:
    """The known encoders for `engine models`, teachers first: name, role, arch, D (None for a student: its
    teacher's), max_side (default longest image side), weights (kind) and source (where from), notes."""
    return [
        {"name": s.name, "role": s.role, "arch": s.arch, "dim": s.dim, "max_side": s.preprocessing.max_side,
         "weights": s.weights.kind, "source": s.weights.detail, "notes": s.description}
        for s in sorted(ENCODERS.values(), key=lambda s: s.role != "teacher")  # teachers first
    ]
