"""ONNX export: the exported graph (head included) computes the encoder's descriptors on real photographs."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from skimage import data

from engine.errors import EngineError
from engine.export import export_command, export_onnx, export_tensorrt
from engine.models import build_student, build_teacher, save_checkpoint

PHOTOS = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def photos(batch: int, height: int, width: int) -> torch.Tensor:
    """`batch` real photographs resized to height x width: B x 3 x H x W float32 in [0, 1]."""
    resized = [
        torch.nn.functional.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255, size=(height, width),
                                        mode="bilinear", align_corners=False)[0]
        for p in (PHOTOS * 2)[:batch]
    ]
    return torch.stack(resized)


def onnx_vectors(path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


@pytest.fixture(scope="module")
def student():
    return build_student("mobilenetv2", 96, "test-space")


@pytest.fixture(scope="module")
def teacher():
    enc = build_teacher("effnet-lite2-gem")
    g = torch.Generator().manual_seed(0)
    # A whitening too, so the exported head covers GeM -> L2 -> W x + b -> L2.
    enc.head.set_whitening(torch.randn(enc.dim, enc.dim, generator=g) / enc.dim**0.5, torch.randn(enc.dim, generator=g) * 0.01)
    return enc.eval()


@pytest.fixture(scope="module")
def whitened_student():
    enc = build_student("mobilenetv2", 96, "test-space")
    g = torch.Generator().manual_seed(1)
    # Projection and whitening: GeM -> L2 -> projection -> L2 -> W x + b -> L2.
    enc.head.set_whitening(torch.randn(64, 96, generator=g) / 96**0.5, torch.randn(64, generator=g) * 0.01)
    return enc.eval()


@pytest.mark.parametrize("which", ["student", "teacher", "whitened-student"])
def test_onnx_matches_torch_on_photographs_across_batch_and_size(which, student, teacher, whitened_student, tmp_path):
    enc = {"student": student, "teacher": teacher, "whitened-student": whitened_student}[which]
    path = export_onnx(enc, tmp_path / f"{which}.onnx")
    # One file, dynamic axes: two batch sizes and two (non-square, odd) image sizes.
    for batch, height, width in [(1, 128, 128), (3, 97, 141)]:
        x = photos(batch, height, width)
        with torch.no_grad():
            want = enc(x).numpy()
        got = onnx_vectors(path, x)
        assert got.shape == want.shape == (batch, enc.dim)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert not np.allclose(got[0], got[-1]) or batch == 1  # distinct photos give distinct vectors


def test_onnx_head_is_plain_ops_with_dynamic_axes(student, tmp_path):
    model = onnx.load(str(export_onnx(student, tmp_path / "s.onnx")))
    ops = {n.op_type for n in model.graph.node}
    assert {"Pow", "ReduceMean"} <= ops  # GeM with its p
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and not dims[1]  # batch, height, width dynamic; channels fixed


def test_export_from_checkpoint_and_command(student, tmp_path):
    ckpt = save_checkpoint(student, tmp_path / "s.safetensors")
    path = export_onnx(ckpt, tmp_path / "from_ckpt.onnx")
    x = photos(2, 96, 128)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_vectors(path, x), student(x).numpy(), atol=1e-4, rtol=0)
    line = export_command(str(ckpt), tmp_path / "cmd.onnx")
    assert "onnx" in line and (tmp_path / "cmd.onnx").exists()
    with pytest.raises(EngineError, match="cannot tell the format"):
        export_command(str(ckpt), tmp_path / "out.bin")


def test_bad_checkpoint_path_names_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(EngineError, match="nope.safetensors"):
        export_onnx(missing, tmp_path / "x.onnx")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EngineError, match="garbage.safetensors"):
        export_onnx(garbage, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_tensorrt_absent_is_a_clear_error(student, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        export_tensorrt(student, tmp_path / "s.engine")


def test_tensorrt_engine_matches_torch(student, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from engine.backends import TensorRTRunner

    path = export_tensorrt(student, tmp_path / "s.engine", fp16=False, min_shape=(1, 64), opt_shape=(2, 128),
                           max_shape=(4, 160))
    runner = TensorRTRunner(path, torch.device("cuda"))
    x = photos(3, 97, 141)
    with torch.no_grad():
        want = student(x).numpy()
    np.testing.assert_allclose(runner(x).cpu().numpy(), want, atol=1e-3, rtol=0)
    with pytest.raises(EngineError, match="outside the engine's profile"):
        runner(photos(1, 200, 200))


def test_a_failed_export_leaves_the_old_file_and_no_temporary(student, tmp_path, monkeypatch):
    out = tmp_path / "s.onnx"
    out.write_bytes(b"the previous export")

    def half_then_fail(model, args, f, **kwargs):
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("exporter died")

    monkeypatch.setattr(torch.onnx, "export", half_then_fail)
    with pytest.raises(RuntimeError, match="exporter died"):
        export_onnx(student, out)
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]
    monkeypatch.undo()
    export_onnx(student, out)  # a real export replaces it whole
    x = photos(1, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(onnx_vectors(out, x), student(x).numpy(), atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]
