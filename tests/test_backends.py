"""Runners: every backend gives eager torch's descriptors; "auto" resolution; the export cache; the encode pipeline."""
import contextlib
import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_export import photos  # one helper for both files: real photographs at a given size

from engine import backends
from engine.backends import GraphedForward, bucket_batch, cache_key, cached_onnx, make_runner, prune_cache, resolve_backend
from engine.encode import EncodeOptions, ShapeBuckets, describe, encode_items, encode_to_array, to_batch
from engine.errors import EngineError
from engine.images import load_image, read_image
from engine.encoder import Encoder, Head
from engine.models import build_student


@pytest.fixture(scope="module")
def student():
    return build_student("mobilenetv2", 64, "test-space")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def eager(enc, x):
    with torch.no_grad():
        return enc(x).numpy()


def test_auto_resolution(monkeypatch):
    assert resolve_backend("auto", "cpu") == "onnxruntime"  # the measured CPU winner (engine/backends.py)
    assert resolve_backend("auto", "cuda") == "torch"  # TensorRT is opt-in (fp16, minutes to build)
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(EngineError, match="onnxruntime package"):
        resolve_backend("onnxruntime", "cpu")
    with pytest.raises(EngineError, match="CUDA only"):
        resolve_backend("tensorrt", "cpu")
    with pytest.raises(EngineError, match="unknown backend 'jax'"):
        resolve_backend("jax", "cpu")


@pytest.mark.parametrize("backend,channels_last", [("torch", False), ("torch", True), ("onnxruntime", None), ("auto", None)])
def test_runner_equals_eager_torch(student, cache, backend, channels_last):
    runner = make_runner(student, backend, "cpu", channels_last=channels_last, cache_dir=cache)
    for height, width in [(128, 128), (97, 141)]:
        x = photos(3, height, width)
        got = runner(x)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == "cpu"
        np.testing.assert_allclose(got.numpy(), eager(student, x), atol=1e-4, rtol=0)


def test_bucket_batch_pads_to_a_power_of_two_then_to_multiples_of_8():
    assert [bucket_batch(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 63, 64)] == [1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 64, 64]


@pytest.mark.parametrize("channels_last", [False, True])
def test_bucketed_runner_on_cpu_equals_the_plain_runner(student, channels_last):
    # cuda_graphs=True on the CPU: the same buckets and padding as on CUDA, the forward run eagerly.
    plain = make_runner(student, "torch", "cpu", channels_last=channels_last, cuda_graphs=False)
    bucketed = make_runner(student, "torch", "cpu", channels_last=channels_last, cuda_graphs=True)
    assert plain.graphed is None and bucketed.graphed is not None
    x = photos(8, 48, 48)
    # 3 rows padded to 4 (zeros), then 4 rows filling the bucket, then 3 again: the padding row now holds an
    # earlier batch's image; then another image size.
    for batch in (x[:3], x[4:8], x[5:8].flip(0), photos(2, 40, 56)):
        got = bucketed(batch)
        assert got.shape == (len(batch), student.dim) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), plain(batch).numpy(), atol=1e-5, rtol=0)
    assert list(bucketed.graphed.buckets) == [(4, 3, 48, 48), (2, 3, 40, 56)]
    assert all(b.input.is_contiguous(memory_format=torch.channels_last) == channels_last
               for b in bucketed.graphed.buckets.values())


def test_buckets_are_least_recently_used_and_bounded():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    graphed = GraphedForward(net, torch.device("cpu"), channels_last=False, capacity=2)
    a, b, c = torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8), torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        graphed(a)
        first = graphed.buckets[(2, 3, 8, 8)]
        graphed(b)
        graphed(a)  # a's bucket is now the most recent: c's arrival drops b's
        graphed(c)
        assert list(graphed.buckets) == [(2, 3, 8, 8), (2, 3, 9, 9)]
        assert graphed.buckets[(2, 3, 8, 8)] is first  # kept, not rebuilt
        torch.testing.assert_close(graphed(b), net(b), rtol=0, atol=1e-6)  # rebuilt after its eviction
        assert list(graphed.buckets) == [(2, 3, 9, 9), (4, 3, 8, 8)]
    with pytest.raises(ValueError, match="capacity"):
        GraphedForward(net, torch.device("cpu"), channels_last=False, capacity=0)


class ReplayOnCpu:
    """Stands in for a CUDA graph on the CPU: a replay reruns the captured call and writes into its static output."""

    def __init__(self, fn, out):
        self.fn, self.output, self.replays = fn, out, 0

    def replay(self):
        self.output.copy_(self.fn())
        self.replays += 1


def test_graph_policy_capture_on_second_call_replay_and_copy_out(monkeypatch):
    # The CUDA-only steps of GraphedForward run on the CPU with a stand-in for the graph: when a bucket is captured,
    # that later calls replay it, and that what a call returns is not overwritten by the next replay.
    captured = []

    def capture(fn, device):
        out = fn()
        captured.append(ReplayOnCpu(fn, out))
        return captured[-1], out

    monkeypatch.setattr(backends, "capture_cuda_graph", capture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # a CPU "device" to replay on
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    graphed = GraphedForward(net, torch.device("cpu"), channels_last=False, capacity=1)
    graphed.graphs = True
    a, b = torch.rand(3, 3, 8, 8), torch.rand(4, 3, 8, 8)
    out_a = graphed(a)  # first call: eager
    assert captured == []
    out_b = graphed(b)  # second call of bucket 4: captured, then replayed
    assert len(captured) == 1 and captured[0].replays == 1
    out_a2 = graphed(a)  # a replay on a's images
    assert len(captured) == 1 and captured[0].replays == 2
    with torch.no_grad():
        for got, x in ((out_a, a), (out_b, b), (out_a2, a)):
            torch.testing.assert_close(got, net(x), rtol=0, atol=1e-6)  # out_b survived the replay after it
    graphed(torch.rand(2, 3, 9, 9))  # capacity 1: a new bucket drops the captured one
    graphed(a)
    assert len(captured) == 1  # bucket 4 is back, but on its first call again: eager


def test_a_failed_capture_falls_back_to_the_eager_forward(monkeypatch):
    # A model whose forward cannot be captured (an op that synchronises, say) still encodes: eagerly, said once.
    def capture(fn, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(backends, "capture_cuda_graph", capture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    graphed = GraphedForward(net, torch.device("cpu"), channels_last=False)
    graphed.graphs = True
    x = torch.rand(4, 3, 8, 8)
    graphed(x)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = graphed(x)  # the second call would capture
    assert graphed.graphs is False
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(graphed(x), net(x), rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_the_eager_forward_on_the_gpu(monkeypatch):
    # TF32 off: the padded batch of 4 may get other cuDNN algorithms than the eager batch of 3, which TF32's
    # rounding would set apart by ~1e-3; in float32 they agree to ~1e-6.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    enc = build_student("effnet-lite0", 1280, "s")
    eager_gpu = make_runner(enc, "torch", "cuda", cuda_graphs=False)
    graphed = make_runner(enc, "torch", "cuda")  # the default on CUDA
    assert graphed.graphed is not None and graphed.graphed.graphs
    x = photos(8, 160, 224)
    # eager (first call), captured and replayed, replayed, a padded batch replayed twice
    for batch in (x[:4], x[4:8], x[:4], x[:3], x[2:5]):
        got, want = graphed(batch), eager_gpu(batch)
        assert got.device.type == "cuda" and got.shape == want.shape
        # The same kernels on the same shapes: equal to float32 rounding; a padded batch: other algorithms, maybe.
        tol = 1e-5 if len(batch) == 4 else 1e-4
        assert (got - want).abs().max().item() <= tol, len(batch)
    assert list(graphed.graphed.buckets) == [(4, 3, 160, 224)]
    assert all(b.graph is not None and b.calls == 5 for b in graphed.graphed.buckets.values())


def multiscale_float64(enc, x: torch.Tensor, scales, p: float) -> np.ndarray:
    """cirtorch's multi-scale descriptor written out: per scale, the head in float64 from the trunk's map
    (GeM -> L2 -> [W x + b] -> L2); the scales combined by the power mean with exponent p; L2."""
    acc = 0
    for s in scales:
        xs = x if s == 1.0 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        with torch.no_grad():
            fmap = enc.trunk((xs - enc.mean) / enc.std).double().numpy()
        pg = enc.head.p.detach().item()
        g = np.mean(np.maximum(fmap, 1e-6) ** pg, axis=(2, 3)) ** (1 / pg)
        v = g / np.linalg.norm(g, axis=1, keepdims=True)
        if enc.head.project is not None:
            v = v @ enc.head.project.weight.detach().double().numpy().T + enc.head.project.bias.detach().double().numpy()
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
        acc = acc + np.maximum(v, 0) ** p if p != 1.0 else acc + v
    v = (acc / len(scales)) ** (1 / p)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("head", ["student", "gem-only"])
def test_multiscale_descriptor_matches_the_formula(student, cache, head):
    # A student's linear head combines its scales by the plain mean (p = 1); a GeM-only head by GeM's own p.
    if head == "student":
        enc, p = student, 1.0
    else:
        enc = Encoder(student.trunk, Head(1280, p=2.5), {"name": "gem-only", "arch": "mobilenetv2", "dim": 1280, "space": "s"},
                      student.mean.flatten().tolist(), student.std.flatten().tolist()).eval()
        p = 2.5
    x = photos(2, 128, 160)
    scales = (1.0, 0.707, 0.5)
    want = multiscale_float64(enc, x, scales, p)
    np.testing.assert_allclose(describe(enc, x, scales).numpy(), want, atol=1e-6, rtol=0)
    runner = make_runner(enc, "onnxruntime", cache_dir=cache)
    np.testing.assert_allclose(describe(enc, x, scales, runner).numpy(), want, atol=1e-4, rtol=0)


def test_onnx_cache_is_keyed_by_weights_and_reused(student, cache, monkeypatch):
    path = cached_onnx(student, cache)
    assert path.exists() and cache_key(student) in path.name
    monkeypatch.setattr(backends, "export_onnx", lambda *a: pytest.fail("an unchanged encoder must not be exported again"))
    assert cached_onnx(student, cache) == path
    other = build_student("mobilenetv2", 64, "test-space", seed=1)  # same name and space, other random head
    assert cache_key(other) != cache_key(student)


def test_prune_cache_keeps_the_newest(tmp_path):
    for i in range(5):
        f = tmp_path / f"m{i}.onnx"
        f.write_bytes(b"x")
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "other.engine").write_bytes(b"x")
    prune_cache(tmp_path, "*.onnx", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m3.onnx", "m4.onnx", "other.engine"]


def test_tensorrt_runner_absent_is_a_clear_error(student, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        make_runner(student, "tensorrt", "cuda")


def test_tensorrt_runner_matches_torch(student, cache):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    runner = make_runner(student, "tensorrt", "cuda", cache_dir=cache, fp16=True, max_batch=4, max_side=256)
    x = photos(3, 97, 141)
    np.testing.assert_allclose(runner(x).cpu().numpy(), eager(student.cpu(), x), atol=2e-2)  # fp16 trunk


def test_shape_buckets_batch_equal_shapes_within_the_window():
    b = ShapeBuckets(batch_size=2, window=3)
    a, c = torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)
    b.add(0, a)
    b.add(1, c)
    assert b.pop_ready() == []  # nothing full, 2 waiting <= window
    b.add(2, a)
    assert [[i for i, _ in g] for g in b.pop_ready()] == [[0, 2]]  # a full batch of one shape
    b.add(3, a)
    b.add(4, torch.zeros(3, 5, 5))
    b.add(5, torch.zeros(3, 6, 5))
    # 4 waiting > window 3: the bucket holding the oldest item (1) leaves part-full
    assert [[i for i, _ in g] for g in b.pop_ready()] == [[1]]
    assert sorted(i for g in b.pop_ready(flush=True) for i, _ in g) == [3, 4, 5]
    assert b.count == 0 and not b.groups


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """Seven real JPEG files, four of one size and three of others, plus an undecodable one at index 3."""
    root = tmp_path_factory.mktemp("jpegs")
    imgs = [data.astronaut(), data.coffee(), data.chelsea(), None, data.rocket(), data.astronaut()[::-1], data.coffee()[:, ::-1], data.astronaut()[:, ::-1]]
    paths = []
    for i, img in enumerate(imgs):
        p = root / f"{i}.jpg"
        if img is None:
            p.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(np.ascontiguousarray(img)).save(p, quality=90)
        paths.append(p)
    return paths


def test_encode_pipeline_backends_agree_and_keep_order(student, cache, jpegs):
    items = [(p, None) for p in jpegs]
    base = dict(max_side=128, batch_size=2, workers=1, skip_bad=True, progress=False, cache_dir=str(cache), window=2)
    v_torch, kept, skipped = encode_to_array(student, items, EncodeOptions(backend="torch", **base))
    v_ort, kept_ort, _ = encode_to_array(student, items, EncodeOptions(backend="onnxruntime", **base))
    assert kept == kept_ort == [0, 1, 2, 4, 5, 6, 7]
    assert [s["item"] for s in skipped] == [3] and "3.jpg" in skipped[0]["error"]
    np.testing.assert_allclose(v_ort, v_torch, atol=1e-4)
    # Each vector is its own image's, whatever batch it shared: compare with one-by-one eager encoding.
    for row, i in enumerate(kept):
        np.testing.assert_allclose(v_torch[row], eager(student, load_image(jpegs[i], 128)[None])[0], atol=1e-4)
    with pytest.raises(EngineError, match="3.jpg"):
        encode_to_array(student, items, EncodeOptions(backend="torch", **{**base, "skip_bad": False}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA encoding path needs a CUDA device")
def test_cuda_encoding_matches_the_cpu(jpegs):
    items = [(p, [20, 10, 400, 300] if i % 2 else None) for i, p in enumerate(jpegs) if i != 3]
    base = dict(max_side=224, batch_size=3, progress=False, backend="torch", decode="host")  # the forward, not nvJPEG (tests/test_device_decode.py)
    cpu, _, _ = encode_to_array(build_student("effnet-lite0", 1280, "s"), items, EncodeOptions(device="cpu", **base))
    gpu, _, _ = encode_to_array(build_student("effnet-lite0", 1280, "s"), items, EncodeOptions(device="cuda", **base))
    # cuDNN convolves in TF32 by default: unit vectors agree to about 1e-3, and so do their rankings.
    assert np.abs(cpu - gpu).max() < 5e-3
    np.testing.assert_array_equal(np.argsort(-cpu @ cpu.T, 1)[:, :3], np.argsort(-gpu @ gpu.T, 1)[:, :3])


def test_to_batch_gives_load_image_values(jpegs):
    same_size = [jpegs[i] for i in (0, 5, 7)]  # the astronaut and two of its mirrorings
    x = to_batch([read_image(p, 100) for p in same_size], torch.device("cpu"))
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (3, 3, 100, 100)
    assert torch.equal(x, torch.stack([load_image(p, 100) for p in same_size]))


def test_decoding_threads_give_inline_decodings_results(student, jpegs):
    # boxes on every other item, a bad file (3), three image sizes, a window that forces part-full batches
    items = [(p, [20, 10, 400, 300] if i % 2 else None) for i, p in enumerate(jpegs)]
    base = dict(max_side=96, batch_size=3, skip_bad=True, progress=False, window=1)
    runner = make_runner(student, "torch", channels_last=False)
    vecs, kept, skipped = encode_to_array(student, items, EncodeOptions(workers=0, **base), runner)
    assert kept == [0, 1, 2, 4, 5, 6, 7] and [s["item"] for s in skipped] == [3]
    np.testing.assert_allclose(vecs[1], eager(student, load_image(jpegs[1], 96, [20, 10, 400, 300])[None])[0], atol=1e-4)
    for workers in (1, 3):
        got = encode_to_array(student, items, EncodeOptions(workers=workers, **base), runner)
        np.testing.assert_array_equal(got[0], vecs)  # same batches in the same order: bit-identical
        assert got[1:] == (kept, skipped)
    stream = encode_items(student, items, EncodeOptions(workers=2, **base), runner)
    next(stream)
    stream.close()  # a consumer that stops early: queued decodes are cancelled, the threads end
    assert not [t for t in threading.enumerate() if t.name.startswith("aml-decode")]
