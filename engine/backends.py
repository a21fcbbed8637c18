"""Runners: one call, images -> descriptors, over eager/compiled torch, onnxruntime or TensorRT.

`make_runner(encoder, backend, device)` returns a callable mapping B x 3 x H x W float32 images
(RGB in [0, 1]) to B x D float32 unit descriptors as a torch tensor on the runner's `device`:
the torch or TensorRT device, or CPU for onnxruntime (host arrays even with its CUDA provider). Multi-scale and batching stay with the caller
(`engine.encode.describe`, `encode_items`): a runner only runs the network.

onnxruntime and TensorRT run a file exported from the encoder; it is cached under `cache_dir`
by the encoder's name, embedding space and weights hash, so a changed encoder never reuses a
stale file and an unchanged one is exported once.

Which backend "auto" picks on CPU was measured (bench/bench_encode.py, 2-core x86 machine,
student at 362 x 362, batch 8, median of repeats): see `CPU_AUTO` below. On CUDA "auto" is
eager torch with the fused Triton head, replayed as CUDA graphs (`GraphedForward`): one graph per
(padded batch, image size) bucket captures the whole forward, trunk and head, so the host issues one launch
per batch instead of hundreds; TensorRT is opt-in because its engine is fp16 by default (different numbers)
and takes minutes to build the first time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch

from .errors import EngineError
from .export import DEFAULT_OPSET, INPUT, OUTPUT, TRT_MAX, TRT_MIN, TRT_OPT, export_onnx, export_tensorrt, import_tensorrt
from .encoder import Encoder, weights_hash

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
# Measured (2 shared x86 cores, batch 8 at 362 x 362, median of 3-5, images/s): MobileNetV2 student eager torch
# NCHW 1.3-2.1, channels_last 2.3-3.8, onnxruntime 6.2-10.9; EfficientNet-Lite0 1.3 / 2.2-3.6 / 4.6-8.1.
# onnxruntime wins by 2-4x (bench/bench_encode.py, test_encode).
CPU_AUTO = "onnxruntime"
# channels_last in eager torch on CPU: 1.2-1.8x faster for these trunks (same measurement); on CUDA it lets
# cuDNN pick NHWC (tensor-core) kernels.
CPU_CHANNELS_LAST = True
# Captured CUDA graphs kept per torch runner (least recently used dropped first): each holds its own memory pool
# (the forward's activations at that bucket's shape, a few GB for a 1024-px batch), and an encoding job meets a
# few image sizes (landscape, portrait, the last part-full batch).
GRAPH_BUCKETS = 4
# A bucket is captured on its second call, not its first: sizes seen once (or cycling through more buckets than
# are kept, as multi-scale encoding of mixed orientations can) then run eagerly instead of paying a capture each.
CAPTURE_AFTER = 2
# Exports are tens of MB and training validates a new student every epoch: keep only the newest few.
CACHE_KEEP = 8

T = TypeVar("T")


class Runner(Protocol):
    """images (B x 3 x H x W float32 in [0, 1]) -> B x D float32 descriptors; `device` holds both."""

    backend: str
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def default_cache_dir() -> Path:
    """Where exported files are cached when the caller names no folder: ~/.cache/aml-engine."""
    return Path.home() / ".cache" / "aml-engine"


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """The concrete backend for a request: "auto" -> the fastest installed one for the device (see CPU_AUTO)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cpu" and CPU_AUTO == "onnxruntime" and onnxruntime_available():
            return "onnxruntime"
        return "torch"
    if backend == "onnxruntime" and not onnxruntime_available():
        raise EngineError("backend 'onnxruntime' needs the onnxruntime package: `pip install aml-engine[onnx]`")
    if backend == "tensorrt" and device.type != "cuda":
        raise EngineError("backend 'tensorrt' runs on CUDA only: pass --device cuda")
    return backend


def cache_key(encoder: Encoder) -> str:
    """A file-name-safe key for an encoder's exported files: name, a hash of its space and of its weights."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name).strip("_") or "encoder"
    space = hashlib.sha256(encoder.space.encode()).hexdigest()[:8]
    return f"{slug}-{space}-{weights_hash(encoder)[:16]}"


def cached_onnx(encoder: Encoder, cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """The encoder's ONNX file in the cache, exported on first use; returns its path."""
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(encoder)}-opset{opset}.onnx"
    if path.exists():
        os.utime(path)  # most recently used: the last to be pruned
    else:
        export_onnx(encoder, path, opset)
        prune_cache(path.parent, "*.onnx")
    return path


def prune_cache(folder: Path, pattern: str, keep: int = CACHE_KEEP) -> None:
    """Delete all but the `keep` most recently used files matching `pattern` in `folder`."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)


# ---------------------------------------------------------------- the runners


def bucket_batch(n: int) -> int:
    """The batch a graph is captured for: the smallest power of two >= n up to 8, then the next multiple of 8.
    A few buckets serve small batches; a large one wastes at most 7 padding rows (a power of two could waste
    a third of a batch of 24), and a batch size that is a multiple of 8 runs unpadded."""
    return 1 << max(n - 1, 0).bit_length() if n <= 8 else -(-n // 8) * 8


def capture_cuda_graph(fn: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """One call of `fn` captured as a CUDA graph: returns the graph and the call's output, the static tensors
    every `graph.replay()` rewrites. A first call runs on a side stream (lazy initialisation, Triton's
    compilation), as PyTorch's CUDA graph docs require before a capture. thread_local: other threads (decoding
    images on the GPU, say) may keep using CUDA meanwhile; only this thread's calls are restricted. The capture
    runs on `device` and its own stream, whichever device is current (torch.cuda.graph's default stream is made
    once, on the device current at the process's first capture)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            out = fn()
    return graph, out


class _Bucket:
    """One shape bucket: a static input (padded batch x 3 x H x W float32) and, on CUDA, the graph captured over it
    with its static output."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.input = torch.empty(shape, device=device, dtype=torch.float32, memory_format=fmt).zero_()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.calls = 0

    def capture(self, model: torch.nn.Module) -> None:
        self.graph, self.output = capture_cuda_graph(lambda: model(self.input), self.input.device)


class GraphedForward:
    """`model` run over shape buckets: a batch of n images is copied into the static input of the bucket
    (bucket_batch(n), 3, H, W), the bucket's forward runs, the first n rows are returned as a new tensor.

    With `graphs` (True on CUDA) a bucket's forward is a CUDA graph, captured on its CAPTURE_AFTER-th call and
    replayed from then on; earlier calls, and every call elsewhere, run the model eagerly on the same padded input
    (the path the CPU tests cover). Padding rows hold zeros or an earlier batch's images: every layer of an
    eval-mode encoder is per-image, so they never touch the first n rows. At most `capacity` buckets are kept,
    least recently used dropped first. Calls are serialised by a lock: a bucket's static input and output are
    shared state.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool, capacity: int = GRAPH_BUCKETS):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.model = model
        self.device = device
        self.channels_last = channels_last
        self.capacity = capacity
        self.graphs = device.type == "cuda"
        self.buckets: OrderedDict[tuple[int, ...], _Bucket] = OrderedDict()
        self.lock = threading.Lock()

    @torch.inference_mode()  # a capture must record no autograd state
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x H x W (any device, any float dtype) -> the model's B x D output, float32, on `device`."""
        n = images.shape[0]
        key = (bucket_batch(n), *images.shape[1:])
        with self.lock:
            bucket = self.buckets.pop(key, None) or _Bucket(key, self.device, self.channels_last)
            self.buckets[key] = bucket  # the most recently used: last
            while len(self.buckets) > self.capacity:
                self.buckets.popitem(last=False)
            # Straight into the static input: the host-to-device copy is the only copy of the images.
            bucket.input[:n].copy_(images, non_blocking=True)
            bucket.calls += 1
            if not self.graphs or bucket.calls < CAPTURE_AFTER:
                return self.model(bucket.input)[:n].float()
            with torch.cuda.device(self.device):  # "cuda:1" while another device is current: replay there
                if bucket.graph is None:
                    try:
                        bucket.capture(self.model)
                    except RuntimeError as e:  # a model that cannot be captured still encodes, eagerly from now on
                        self.graphs = False
                        warnings.warn(f"CUDA graph capture failed, the encoder runs eagerly: {e}", RuntimeWarning)
                        return self.model(bucket.input)[:n].float()
                bucket.graph.replay()
            # A copy: the next replay overwrites the static output.
            return bucket.output[:n].float().clone()


class TorchRunner:
    """Eager (or torch.compile'd) encoder under inference_mode, or its CUDA graphs (`GraphedForward`) when
    `cuda_graphs`; output on the runner's device."""

    backend = "torch"

    def __init__(self, encoder: Encoder, device: torch.device, compile: bool, channels_last: bool,
                 cuda_graphs: bool = False):
        self.device = device
        self.channels_last = channels_last
        model = encoder.to(device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        # dynamic=None: static first, then one shape-generic recompile when a second image size arrives.
        self.model = torch.compile(model) if compile else model
        self.graphed = GraphedForward(self.model, device, channels_last) if cuda_graphs else None

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.graphed is not None:
            return self.graphed(images)
        x = images.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float()


class OnnxRuntimeRunner:
    """An onnxruntime session over the encoder's cached ONNX file; CUDA provider when asked and installed."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: Path, device: torch.device, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # One pool sized like torch's, so both backends compete equally with the decoding workers.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No busy-waiting between ops: on a few cores the spinning threads take CPU from the decoding workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineError("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise EngineError(f"onnxruntime cannot load the model ({type(e).__name__}: {e})".splitlines()[0], onnx_path) from None
        self.device = torch.device("cpu")  # inputs and outputs are host arrays, whichever provider runs them

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([OUTPUT], {INPUT: x})
        return torch.from_numpy(out)


class TensorRTRunner:
    """A deserialized TensorRT engine run on torch's current CUDA stream; inputs must lie in its profile."""

    backend = "tensorrt"

    def __init__(self, engine_path: Path, device: torch.device):
        import tensorrt as trt

        self.device = device
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineError("TensorRT cannot load the engine (built by another TensorRT version or GPU?)", engine_path)
        self.context = self.engine.create_execution_context()
        self.lo, _, self.hi = self.engine.get_tensor_profile_shape(INPUT, 0)
        self.out_dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[self.engine.get_tensor_dtype(OUTPUT)]
        self.path = engine_path

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        shape = tuple(images.shape)
        if not all(lo <= s <= hi for lo, s, hi in zip(self.lo, shape, self.hi)):
            raise EngineError(f"input {shape} is outside the engine's profile {tuple(self.lo)}..{tuple(self.hi)}", self.path)
        x = images.to(self.device, torch.float32, non_blocking=True).contiguous()
        self.context.set_input_shape(INPUT, shape)
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self.out_dtype, device=self.device)
        self.context.set_tensor_address(INPUT, x.data_ptr())
        self.context.set_tensor_address(OUTPUT, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT execution failed", self.path)
        return out.float()


def make_runner(
    encoder: Encoder,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    compile: bool = False,
    channels_last: bool | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    fp16: bool = True,
    max_batch: int = TRT_MAX[0],
    max_side: int = TRT_MAX[1],
    cuda_graphs: bool | None = None,
) -> Runner:
    """A callable images (B x 3 x H x W float32 in [0, 1]) -> B x D float32 descriptors (torch tensor).

    backend: "auto" (resolve_backend), "torch", "onnxruntime" or "tensorrt"; device: "cpu" or "cuda".
    torch only: compile (torch.compile), channels_last (None: on for CUDA, CPU_CHANNELS_LAST on CPU) and
    cuda_graphs (None: on for CUDA without compile; on CPU True runs the same shape buckets eagerly).
    onnxruntime: threads (intra-op; None: torch's thread count). tensorrt: fp16 and the profile's
    max_batch / max_side. Exported files are cached in cache_dir (None: default_cache_dir()).
    The torch runner moves `encoder` to `device`; the others leave it where it is.
    """
    device = torch.device(device)
    name = resolve_backend(backend, device)
    if name == "torch":
        cl = (device.type == "cuda" or CPU_CHANNELS_LAST) if channels_last is None else channels_last
        graphs = (device.type == "cuda" and not compile) if cuda_graphs is None else cuda_graphs
        return TorchRunner(encoder, device, compile, cl, graphs)
    if name == "onnxruntime":
        return OnnxRuntimeRunner(cached_onnx(encoder, cache_dir), device, threads)
    trt = import_tensorrt()
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device))
    tag = f"{'fp16' if fp16 else 'fp32'}-b{max_batch}-s{max_side}-trt{trt.__version__}-{gpu}"
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(encoder)}-{tag}.engine"
    if not path.exists():
        opt = (min(TRT_OPT[0], max_batch), min(TRT_OPT[1], max_side))
        export_tensorrt(cached_onnx(encoder, cache_dir), path, fp16, TRT_MIN, opt, (max_batch, max_side))
    return TensorRTRunner(path, device)
