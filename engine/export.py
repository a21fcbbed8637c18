"""Deployable encoders: ONNX files and TensorRT engines, the head included.

`export_onnx` traces the whole encoder (normalisation, trunk, GeM -> L2 -> [linear:
whitening or a student's map to its teacher] -> L2) with dynamic batch, height and width. The head traces through the
torch reference of `kernels.gem_whiten` (export runs on CPU, where the dispatcher picks
it), so GeM becomes Clip -> Pow(p) -> ReduceMean -> Pow(1/p) with the learned p frozen
as a constant: plain ONNX ops that onnxruntime and TensorRT run natively.

The exporter is torch's TorchScript-based one (`dynamo=False`): it needs no extra
package (the torch.export-based one needs onnxscript), exports a trunk in seconds and
traces timm's TF-"same" padding size-generically (tests check odd sizes).

`export_tensorrt` parses that ONNX file into a TensorRT network with one optimisation
profile over batch and image size. The head stays plain TensorRT layers pinned to fp32
even in an fp16 engine: GeM raises activations to the power p ~ 3, which overflows fp16
(a feature of 50 gives 125,000 > 65,504). A Triton-built TensorRT plugin for the fused
head was not done: it would mean compiling the Triton kernel ahead of time to a cubin per
GPU architecture and wrapping it in an IPluginV3 in C++, for a head that is a few
elementwise passes over the last feature map (~1% of an encoder's time), and no GPU was
at hand to build or test it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .encoder import Encoder
from .errors import EngineError
from .files import write_bytes, written_by
from .models import load_encoder

INPUT = "images"
OUTPUT = "vectors"
DEFAULT_OPSET = 17
HEAD_SCOPE = "/head/"  # the exporter names nodes by module path: the head's nodes start with this
TRACE_SHAPE = (2, 3, 128, 96)  # any valid shape: batch, height and width are exported as dynamic axes
# TensorRT profile defaults: (batch, side) for min / opt / max; sides cover `engine encode --max-side 1024`.
TRT_MIN = (1, 32)
TRT_OPT = (8, 362)
TRT_MAX = (32, 1024)


def _as_encoder(encoder_or_ckpt: Encoder | str | Path) -> Encoder:
    """An Encoder as is; else a source for `engine.models.load_encoder` (a missing file is an EngineError naming it)."""
    return encoder_or_ckpt if isinstance(encoder_or_ckpt, Encoder) else load_encoder(encoder_or_ckpt)


def export_onnx(encoder_or_ckpt: Encoder | str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write an encoder (or a source for `load_encoder`: registry teacher, checkpoint, cirtorch .pth) as an
    ONNX file; returns its path.

    The graph maps `images` (B x 3 x H x W float32 RGB in [0, 1]; B, H, W dynamic) to `vectors`
    (B x D float32 unit rows), the same function as `Encoder.forward` on CPU. Written through
    `engine.files.written_by` (a temporary name unique to the process and thread, then renamed), so a
    reader never sees half a file and two processes may export the same file. The encoder is not changed.
    """
    encoder = _as_encoder(encoder_or_ckpt)
    out_path = Path(out_path)
    # Trace a CPU copy in eval mode: BatchNorm on running statistics, and the head's torch reference path.
    model = _cpu_copy(encoder)
    with warnings.catch_warnings(), written_by(out_path) as tmp:
        # The legacy exporter announces its deprecation, and the head's input checks become trace constants.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (torch.rand(*TRACE_SHAPE),),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"}},
        )
    return out_path


def _cpu_copy(encoder: Encoder) -> Encoder:
    """The encoder itself when it already sits on CPU in eval mode, else an eval-mode CPU copy."""
    import copy

    on_cpu = all(t.device.type == "cpu" for t in encoder.parameters())
    if on_cpu and not encoder.training:
        return encoder
    return copy.deepcopy(encoder).cpu().eval()


def import_tensorrt():
    """The tensorrt module, or an EngineError saying how to install it."""
    try:
        import tensorrt
    except ImportError:
        raise EngineError(
            "TensorRT is not installed: `pip install aml-engine[tensorrt]` on a machine with an NVIDIA GPU "
            "(or use backend 'onnxruntime' / 'torch')"
        ) from None
    return tensorrt


def _profile_shapes(min_shape, opt_shape, max_shape) -> list[tuple[int, int, int, int]]:
    """(batch, side) pairs or full B x 3 x H x W shapes -> three 4-d shapes, checked min <= opt <= max."""
    shapes = []
    for s in (min_shape, opt_shape, max_shape):
        s = tuple(int(v) for v in s)
        shapes.append((s[0], 3, s[1], s[1]) if len(s) == 2 else s)
    for s in shapes:
        if len(s) != 4 or s[1] != 3:
            raise EngineError(f"a TensorRT profile shape is (batch, side) or (B, 3, H, W), got {s}")
    lo, opt, hi = shapes
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise EngineError(f"TensorRT profile needs min <= opt <= max in every axis, got {lo}, {opt}, {hi}")
    return shapes


def export_tensorrt(
    onnx_or_ckpt: Encoder | str | Path,
    out_path: str | Path,
    fp16: bool = True,
    min_shape: tuple[int, ...] = TRT_MIN,
    opt_shape: tuple[int, ...] = TRT_OPT,
    max_shape: tuple[int, ...] = TRT_MAX,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine (needs the `tensorrt` package and an NVIDIA GPU); returns its path.

    onnx_or_ckpt: an .onnx file written by `export_onnx`, an Encoder, or a checkpoint (exported first,
    beside `out_path`). Shapes are (batch, side) for square images or full (B, 3, H, W); the engine
    accepts any input between min and max and is tuned for opt. fp16: trunk in fp16, head in fp32.
    Input `images` float32 B x 3 x H x W, output `vectors` float32 B x D.
    """
    trt = import_tensorrt()
    shapes = _profile_shapes(min_shape, opt_shape, max_shape)
    out_path = Path(out_path)
    onnx_path = Path(onnx_or_ckpt) if isinstance(onnx_or_ckpt, (str, Path)) else None
    if onnx_path is None or onnx_path.suffix != ".onnx":
        onnx_path = export_onnx(onnx_or_ckpt, out_path.with_suffix(".onnx"))
    if not onnx_path.exists():
        raise EngineError("ONNX file not found", onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode of TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse the ONNX graph ({errors})", onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if HEAD_SCOPE in layer.name:  # GeM's x^p overflows fp16: the head runs in fp32
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build an engine (see its log above)", onnx_path)
    write_bytes(out_path, bytes(serialized))
    return out_path


def export_command(
    model: str,
    out: Path,
    fmt: str | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = True,
    min_shape: tuple[int, int] = TRT_MIN,
    opt_shape: tuple[int, int] = TRT_OPT,
    max_shape: tuple[int, int] = TRT_MAX,
    weights: str | None = None,
) -> str:
    """`engine export`: a source for `load_encoder` (teacher name, checkpoint, cirtorch .pth) -> an .onnx file
    or a TensorRT .engine / .plan.

    fmt: "onnx" or "tensorrt"; None infers it from `out`'s suffix. Returns a one-line summary to print.
    """
    fmt = fmt or ("onnx" if out.suffix == ".onnx" else "tensorrt" if out.suffix in (".engine", ".plan") else None)
    if fmt not in ("onnx", "tensorrt"):
        raise EngineError("cannot tell the format: pass --format onnx|tensorrt or name the output .onnx / .engine", out)
    encoder = load_encoder(model, weights)
    if fmt == "onnx":
        path = export_onnx(encoder, out, opset)
    else:
        path = export_tensorrt(encoder, out, fp16, min_shape, opt_shape, max_shape)
    return f"wrote {fmt} {path} for {encoder.name} (D = {encoder.dim}, space {encoder.space})"
