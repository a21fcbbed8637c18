"""Encoding throughput: images/s per model x backend x image size, teachers and students side by side.

Run: `pytest bench/bench_encode.py --benchmark-json=encode.json` (the default grid takes a few minutes on
2 cores); `AML_BENCH_FULL=1` runs the full grid (every model x backend x 224 / 362 / 1024 px).
Every case's extra_info holds images_per_s at the median time. Two cases time pairs side by side,
interleaved so that load from other processes hits both alike, and assert the targets:
  - test_student_vs_resnet101_teacher: a student at 362 px on the default backend ("auto") encodes
    at least STUDENT_SPEEDUP times the images/s of the ResNet-101 teacher in eager torch;
  - test_pipeline_vs_bare_forward: the `engine encode` loop (encode_items: decode + resize workers,
    size bucketing, in-order output) on 24 real JPEG files at 1024 px costs at most PIPELINE_OVERHEAD
    times the bare forward passes over the same decoded images in the same batches. Its fixed cost per
    run (forking the decoding worker, whose copy-on-write faults hit the runner's activation memory)
    is amortised over the images: a bulk encode of thousands pays it once.
ResNet-101 is random-init (no weights ship offline); its speed does not depend on its weights.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from PIL import Image
from skimage import data

from engine.backends import make_runner, resolve_backend
from engine.encode import EncodeOptions, ShapeBuckets, encode_items
from engine.images import load_image
from engine.models import ARCHS, Encoder, Head, build_student, build_teacher

FULL = os.environ.get("AML_BENCH_FULL") == "1"
BATCH = 8
STUDENT_SPEEDUP = 6.0
PIPELINE_OVERHEAD = 1.2
TEACHER_DIM = 2048  # students map into the ResNet-101 teacher's space


def resnet101_teacher() -> Encoder:
    """The cirtorch ResNet-101 GeM teacher's network, random init: trunk + GeM head, D = 2048."""
    arch = ARCHS["resnet101"]
    config = {"name": "resnet101-gem", "arch": "resnet101", "role": "teacher", "dim": arch.channels, "space": "bench"}
    return Encoder(arch.make(None), Head(arch.channels), config).eval()


MODELS = {
    "mobilenetv2": lambda: build_student("mobilenetv2", TEACHER_DIM, "bench"),
    "effnet-lite0": lambda: build_student("effnet-lite0", TEACHER_DIM, "bench"),
    "effnet-lite2-gem": lambda: build_teacher("effnet-lite2-gem"),
    "resnet101-gem": resnet101_teacher,
}
_built: dict[str, Encoder] = {}


def model(name: str) -> Encoder:
    if name not in _built:
        _built[name] = MODELS[name]()
    return _built[name]


def grid() -> list[tuple[str, str, int]]:
    if FULL:
        return [(m, b, s) for m in MODELS for b in ("torch", "onnxruntime") for s in (224, 362, 1024)]
    return [(m, b, 362) for m in ("mobilenetv2", "effnet-lite0") for b in ("torch", "onnxruntime")] + [
        ("effnet-lite2-gem", "onnxruntime", 362), ("resnet101-gem", "torch", 362)]


def random_images(batch: int, side: int) -> torch.Tensor:
    return torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.mark.parametrize("name,backend,side", grid(), ids=lambda v: str(v))
def test_encode(benchmark, cache, name, backend, side):
    batch = BATCH if side <= 362 else 2
    runner = make_runner(model(name), backend, cache_dir=cache)
    x = random_images(batch, side)
    runner(x)  # warm-up: first-call allocations and graph optimisation
    benchmark.pedantic(runner, (x,), rounds=3 if side <= 362 else 2, iterations=1)
    benchmark.extra_info.update(model=name, backend=backend, side=side, batch=batch,
                                images_per_s=round(batch / benchmark.stats.stats.median, 2))


def _interleaved(benchmark, calls: dict, rounds: int) -> dict[str, float]:
    """Time each call once per round, in turn, under one benchmark; returns each call's median seconds."""
    times = {k: [] for k in calls}

    def one_round():
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    return {k: statistics.median(v) for k, v in times.items()}


@pytest.mark.parametrize("student", ["mobilenetv2", "effnet-lite0"] if FULL else ["mobilenetv2"])
def test_student_vs_resnet101_teacher(benchmark, cache, student):
    x = random_images(BATCH, 362)
    fast = make_runner(model(student), "auto", cache_dir=cache)
    slow = make_runner(model("resnet101-gem"), "torch", channels_last=False)  # eager torch, as is
    fast(x), slow(x)
    med = _interleaved(benchmark, {"student": lambda: fast(x), "teacher": lambda: slow(x)}, rounds=3)
    ratio = med["teacher"] / med["student"]
    benchmark.extra_info.update(student=student, student_backend=resolve_backend("auto"), side=362, batch=BATCH,
                                student_images_per_s=round(BATCH / med["student"], 2),
                                teacher_images_per_s=round(BATCH / med["teacher"], 2), speedup=round(ratio, 2))
    assert ratio >= STUDENT_SPEEDUP, f"student {BATCH / med['student']:.2f} img/s is only {ratio:.2f}x the teacher's"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list:
    """24 real photographs as JPEG files at 1024 px (longer side): scikit-image's six, each in four mirrorings."""
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"):
        img = Image.fromarray(getattr(data, name)())
        scale = 1024 / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        for k, flip in enumerate(flips):
            paths.append(root / f"{name}_{k}.jpg")
            (img if flip is None else img.transpose(flip)).save(paths[-1], quality=90)
    return paths


@pytest.mark.parametrize("name", ["mobilenetv2", "effnet-lite2-gem"] if FULL else ["mobilenetv2"])
def test_pipeline_vs_bare_forward(benchmark, cache, jpegs, name):
    enc = model(name)
    opts = EncodeOptions(max_side=1024, batch_size=4, workers=1, progress=False)
    t0 = time.perf_counter()
    runner = make_runner(enc, opts.backend, cache_dir=cache)  # once per `engine encode` run: not per image
    setup = time.perf_counter() - t0
    items = [(p, None) for p in jpegs]
    # The bare forward: the same images, decoded beforehand, in the batches the pipeline forms.
    buckets = ShapeBuckets(opts.batch_size, opts.window * opts.batch_size)
    for i, (p, _) in enumerate(items):
        buckets.add(i, load_image(p, opts.max_side))
    batches = [torch.stack([img for _, img in g]) for g in buckets.pop_ready(flush=True)]

    def bare():
        for x in batches:
            runner(x)

    def pipeline():
        for _ in encode_items(enc, items, opts, runner):
            pass

    bare()  # warm-up at every shape
    med = _interleaved(benchmark, {"pipeline": pipeline, "bare": bare}, rounds=3)
    ratio = med["pipeline"] / med["bare"]
    benchmark.extra_info.update(model=name, backend=runner.backend, images=len(items), batches=len(batches),
                                pipeline_images_per_s=round(len(items) / med["pipeline"], 2),
                                bare_images_per_s=round(len(items) / med["bare"], 2),
                                overhead=round(ratio, 3), runner_setup_s=round(setup, 2))
    assert len(batches) < len(items)  # equal sizes did share batches
    assert ratio <= PIPELINE_OVERHEAD, f"encode_items takes {ratio:.2f}x the bare forward time"
