"""Encoding throughput: images/s per model x backend x image size, teachers and students side by side.

Run: `pytest bench/bench_encode.py --benchmark-json=encode.json` (the default grid takes a few minutes on
2 cores); `AML_BENCH_FULL=1` runs the full grid (every model x backend x 224 / 362 / 1024 px).
Every case's extra_info holds images_per_s at the median time. Two cases time pairs side by side,
interleaved so that load from other processes hits both alike, and assert the targets:
  - test_student_vs_resnet101_teacher: a student at 362 px on the default backend ("auto") encodes
    at least STUDENT_SPEEDUP times the images/s of the ResNet-101 teacher in eager torch;
  - test_pipeline_vs_bare_forward: the whole `engine encode` path into a store (encode_to_store: job key,
    decoding threads, size bucketing, batch assembly, forward, in-order output, shard + sha256 + manifest)
    on 24 and on 96 real JPEG files at 1024 px costs at most PIPELINE_OVERHEAD times the bare forward
    passes over the same images, decoded beforehand, in the same batches, on the same runner (built
    once, as one `engine encode` run does; its set-up time is reported apart). The 24-image case also
    times `--workers 0` (decoding between forward passes), which shows what the threads hide.
    Its extra_info also holds each call's median process CPU seconds and minor page faults.
ResNet-101 is random-init (no weights ship offline); its speed does not depend on its weights.
Every case's methods are also records of bench/report.py (a row each in the table printed at the end, images/s
and the ratio to the case's baseline: the torch backend, the teacher, the bare forward; encode.png under --bench-out).
AML_BENCH_DEVICE=cuda (bench/gpu_check.sh) runs the torch backend on the GPU instead: the EfficientNet models and
ResNet-101 at 362 and 1024 px in batches of BATCH_CUDA, the student/teacher pair, and the pipeline on 192 JPEGs at
1024 px for effnet-lite0 and effnet-lite2-gem, three ways in the same rounds: "pipeline" (`engine encode --device
cuda` as it runs by default: JPEGs decoded by nvJPEG, engine.device_decode), "host" (`--decode host`: Pillow in
the threads) and "bare" (the forward alone); there the ratios are reported, not asserted (the issue's target:
pipeline within 1.3x of bare). The CPU's 24-image case also times "device" (`--decode device` on the CPU, the same
code with libjpeg-turbo): `pytest bench/bench_encode.py -k "pipeline and 1024-24"` is the tiny run of that path.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import report
from engine.backends import make_runner, resolve_backend
from engine.encode import EncodeOptions, ShapeBuckets, default_workers, encode_to_store, to_batch
from engine.images import read_image
from engine.models import ENCODERS, Encoder, Head, build_student, build_teacher

FULL = os.environ.get("AML_BENCH_FULL") == "1"
DEVICE = os.environ.get("AML_BENCH_DEVICE", "cpu")
CUDA = DEVICE == "cuda"
BATCH = 8
BATCH_CUDA = {362: 64, 1024: 16}
STUDENT_SPEEDUP = 6.0
PIPELINE_OVERHEAD = 1.2
TEACHER_DIM = 2048  # students map into the ResNet-101 teacher's space


def resnet101_teacher() -> Encoder:
    """The cirtorch ResNet-101 GeM teacher's network, random init: trunk + GeM head, D = 2048."""
    spec = ENCODERS["resnet101-gem"]
    config = {"name": "resnet101-gem", "arch": "resnet101", "role": "teacher", "dim": spec.channels, "space": "bench"}
    return Encoder(spec.trunk(None), Head(spec.channels), config, spec.preprocessing.mean, spec.preprocessing.std).eval()


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
    if CUDA:
        return [(m, "torch", s) for m in ("effnet-lite0", "effnet-lite2-gem", "resnet101-gem") for s in (362, 1024)]
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
def test_encode(benchmark, bench_report, cache, name, backend, side):
    batch = BATCH_CUDA[side] if CUDA else BATCH if side <= 362 else 2
    runner = make_runner(model(name), backend, device=DEVICE, cache_dir=cache)
    x = random_images(batch, side).to(DEVICE)

    def call():
        return runner(x).cpu()  # on CUDA the copy back waits for the forward pass

    call()  # warm-up: first-call allocations and graph optimisation (cuDNN's algorithm search on CUDA)
    benchmark.pedantic(call, rounds=10 if CUDA else 3 if side <= 362 else 2, iterations=1)
    benchmark.extra_info.update(model=name, backend=backend, device=DEVICE, side=side, batch=batch,
                                images_per_s=round(batch / benchmark.stats.stats.median, 2))
    # Backends are separate benchmarks here: their ratio to eager torch is of medians taken minutes apart.
    bench_report.add(benchmark, "encode", f"{name}-{side}px", [report.record(
        backend, batch / benchmark.stats.stats.median, benchmark.stats.stats.data, baseline="torch", unit="images/s")],
        model=name, side=side, batch=batch, device=DEVICE)


def _interleaved(benchmark, calls: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Time each call once per round, in turn, under one benchmark.

    Returns each call's wall seconds per round, and its median process CPU seconds (all threads) and minor page
    faults (copy-on-write and first-touch): under other processes' load the wall time swings, these do not.
    Every other round runs the calls in reverse order (A B, B A, ...), so a load that rises or falls
    during the run does not favour the call that comes first.
    """
    samples = {k: [] for k in calls}
    order = list(calls)

    def one_round():
        for k in order:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            calls[k]()
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            samples[k].append((t1 - t0, cpu, r1.ru_minflt - r0.ru_minflt))
        order.reverse()

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    wall = {k: [s[0] for s in v] for k, v in samples.items()}
    usage = {k: {"cpu_s": round(statistics.median(s[1] for s in v), 2), "minor_faults": int(statistics.median(s[2] for s in v))}
             for k, v in samples.items()}
    return wall, usage


def _report(bench_report, benchmark, case: str, times: dict, baseline: str, per_call: int, **params) -> None:
    """The interleaved calls of one case (`per_call` images each) as report records: images/s and the ratio to
    `baseline` of the same rounds."""
    ratios = report.interleaved_ratios(times, baseline)
    bench_report.add(benchmark, "encode", case, [
        report.record(k, per_call / statistics.median(t), t, baseline=baseline, unit="images/s",
                      ratio=ratios[k][0], ratio_rounds=ratios[k][1]) for k, t in times.items()],
        device=DEVICE, **params)


@pytest.mark.parametrize("student", ["effnet-lite0"] if CUDA else ["mobilenetv2", "effnet-lite0"] if FULL else ["mobilenetv2"])
def test_student_vs_resnet101_teacher(benchmark, bench_report, cache, student):
    batch = BATCH_CUDA[362] if CUDA else BATCH
    x = random_images(batch, 362).to(DEVICE)
    fast = make_runner(model(student), "auto", device=DEVICE, cache_dir=cache)
    slow = make_runner(model("resnet101-gem"), "torch", device=DEVICE, channels_last=False)  # eager torch, as is
    fast(x).cpu(), slow(x).cpu()
    times, _ = _interleaved(benchmark, {"student": lambda: fast(x).cpu(), "teacher": lambda: slow(x).cpu()},
                            rounds=10 if CUDA else 3)
    med = {k: statistics.median(v) for k, v in times.items()}
    _report(bench_report, benchmark, f"{student}-vs-resnet101-362px", times, "teacher", batch, batch=batch)
    ratio = med["teacher"] / med["student"]
    benchmark.extra_info.update(student=student, student_backend=resolve_backend("auto", DEVICE), device=DEVICE, side=362, batch=batch,
                                student_images_per_s=round(batch / med["student"], 2),
                                teacher_images_per_s=round(batch / med["teacher"], 2), speedup=round(ratio, 2))
    assert CUDA or ratio >= STUDENT_SPEEDUP, f"student {batch / med['student']:.2f} img/s is only {ratio:.2f}x the teacher's"


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list:
    """96 real photographs (192 on CUDA) as JPEG files at 1024 px (longer side): scikit-image's six, each in four
    mirrorings, each saved at four (eight) JPEG qualities (distinct files, equal sizes: the pipeline can batch them)."""
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    for quality in (95, 90, 85, 80, 75, 70, 65, 60) if CUDA else (90, 85, 80, 75):
        for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"):
            img = Image.fromarray(getattr(data, name)())
            scale = 1024 / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
            for k, flip in enumerate(flips):
                paths.append(root / f"{name}_{k}_q{quality}.jpg")
                (img if flip is None else img.transpose(flip)).save(paths[-1], quality=quality)
    return paths


def pipeline_cases() -> list[tuple[str, int, int]]:
    if CUDA:
        return [("effnet-lite0", 1024, 192), ("effnet-lite2-gem", 1024, 192)]
    cases = [("mobilenetv2", 1024, 24), ("mobilenetv2", 1024, 96)]
    return cases + [("mobilenetv2", 362, 96), ("effnet-lite2-gem", 1024, 96)] if FULL else cases


@pytest.mark.parametrize("name,side,count", pipeline_cases(), ids=lambda v: str(v))
def test_pipeline_vs_bare_forward(benchmark, bench_report, cache, tmp_path, jpegs, name, side, count):
    enc = model(name)
    opts = EncodeOptions(max_side=side, batch_size=16 if CUDA else 4, workers=default_workers(), progress=False, device=DEVICE)
    t0 = time.perf_counter()
    runner = make_runner(enc, opts.backend, device=DEVICE, cache_dir=cache)  # once per `engine encode` run: not per image
    setup = time.perf_counter() - t0
    items = [(p, None) for p in jpegs[:count]]
    names = [p.name for p, _ in items]
    # The bare forward: the same images, decoded beforehand, in the batches the pipeline forms.
    buckets = ShapeBuckets(opts.batch_size, opts.window * opts.batch_size)
    for i, (p, _) in enumerate(items):
        buckets.add(i, read_image(p, opts.max_side))
    groups = buckets.pop_ready(flush=True)
    batches = [to_batch([img for _, img in g], runner.device) for g in groups]
    bare_vecs = {}

    def bare():
        for g, x in zip(groups, batches):
            bare_vecs.update(zip((i for i, _ in g), runner(x).cpu().numpy()))

    def pipeline(workers: int, decode: str = "auto"):
        return lambda: encode_to_store(enc, items, names, tmp_path / f"w{workers}-{decode}.store",
                                       replace(opts, workers=workers, decode=decode), overwrite=True, runner=runner)

    bare()  # warm-up at every shape
    calls = {"pipeline": pipeline(opts.workers), "bare": bare}
    if CUDA:
        calls["host"] = pipeline(opts.workers, "host")  # the default decodes on the GPU: this is --decode host
        pipeline(opts.workers)()  # warm-up: nvJPEG's first call sets up its decoder
    elif count <= 24:
        calls["workers0"] = pipeline(0)
        calls["device"] = pipeline(opts.workers, "device")
    times, usage = _interleaved(benchmark, calls, rounds=6 if count <= 24 else 4)
    med = {k: statistics.median(v) for k, v in times.items()}
    _report(bench_report, benchmark, f"{name}-{side}px-{count}images", times, "bare", count, images=count)
    ratio = med["pipeline"] / med["bare"]
    benchmark.extra_info.update(model=name, backend=runner.backend, side=side, images=count, batches=len(batches),
                                workers=opts.workers, runner_setup_s=round(setup, 2), load_avg_1min=os.getloadavg()[0],
                                **{f"{k}_images_per_s": round(count / v, 2) for k, v in med.items()},
                                **{f"{k}_vs_bare": round(v / med["bare"], 3) for k, v in med.items() if k != "bare"},
                                usage=usage)
    assert len(batches) < count  # equal sizes did share batches
    bare_all = np.stack([bare_vecs[i] for i in range(count)])
    # the checks reuse the timed runner: a new one would compile again on CUDA
    stored = encode_to_store(enc, items, names, tmp_path / f"w{opts.workers}-host.store", replace(opts, decode="host"),
                             overwrite=True, runner=runner).vectors()
    np.testing.assert_allclose(stored, bare_all, atol=1e-4 if CUDA else 1e-5)
    # Decoded on the device: nvJPEG upsamples chroma by nearest neighbour where Pillow interpolates
    on_device = encode_to_store(enc, items, names, tmp_path / f"w{opts.workers}-device.store",
                                replace(opts, decode="device"), overwrite=True, runner=runner).vectors()
    benchmark.extra_info.update(device_decode_max_abs_diff=float(np.abs(on_device - bare_all).max()),
                                device_decode_min_cosine=float((on_device * bare_all).sum(1).min()))
    assert np.abs(on_device - bare_all).max() < (5e-2 if CUDA else 5e-3)
    assert CUDA or ratio <= PIPELINE_OVERHEAD, f"engine encode takes {ratio:.2f}x the bare forward time"
