"""Encoders: packaged weights load correctly, descriptors against a float64 formula, space ids, deterministic
students, checkpoints, cirtorch teachers."""
import numpy as np
import pytest
import torch
from skimage import data

from engine.errors import EngineError
from engine.models import ENCODERS, build_student, build_teacher, load_checkpoint, load_encoder, save_checkpoint, space_id


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("effnet-lite2-gem")


def cat_image(size=224):
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("arch", ["effnet-lite0", "effnet-lite2", "mobilenetv2"])
def test_packaged_imagenet_weights_classify_a_cat(arch):
    # The key rename / state-dict load is right only if the full classifier still sees a tabby cat (281-285).
    spec = next(s for s in ENCODERS.values() if s.arch == arch)
    weights = spec.weights.locate()
    trunk = spec.trunk(weights).eval()  # BatchNorm on running statistics
    pre = spec.preprocessing
    x = (cat_image() - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        if arch.startswith("effnet"):
            logits = trunk.model(x)
        else:
            import torchvision

            m = torchvision.models.mobilenet_v2(weights=None)
            m.features = trunk
            m.load_state_dict(torch.load(weights, weights_only=True))
            m.eval()
            logits = m(x)
    assert 281 <= int(logits.argmax()) <= 285


def head_float64(fmap: torch.Tensor, p: float, W: torch.Tensor | None = None, b: torch.Tensor | None = None) -> np.ndarray:
    """The head written out in float64 numpy: GeM (clamp 1e-6) -> L2 -> [W x + b] -> L2, per image."""
    f = np.maximum(fmap.double().numpy(), 1e-6)
    g = np.mean(f**p, axis=(2, 3)) ** (1 / p)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if W is not None:
        g = g @ W.double().numpy().T + (0 if b is None else b.double().numpy())
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return g


def test_teacher_descriptors_match_the_formula_and_space_tracks_weights(teacher):
    x = cat_image(160)
    with torch.no_grad():
        v = teacher(x)
        # Lite weights expect [-1, 1] inputs: the trunk sees (x - 0.5) / 0.5.
        want = head_float64(teacher.trunk.model.forward_features((x - 0.5) / 0.5), 3.0)
    np.testing.assert_allclose(v.numpy(), want, atol=1e-6, rtol=0)
    assert teacher.space.startswith("effnet-lite2-gem:")
    assert space_id(teacher) == teacher.space
    with torch.no_grad():
        teacher.head.p.add_(0.5)
    try:
        assert space_id(teacher) != teacher.space  # a different head is a different space
    finally:
        with torch.no_grad():
            teacher.head.p.sub_(0.5)


@pytest.mark.parametrize("bridged", [False, True])
def test_untrained_student_is_the_same_in_every_build(teacher, bridged):
    a = build_student("mobilenetv2", teacher.dim, teacher.space, bridge_to=teacher if bridged else None)
    b = build_student("mobilenetv2", teacher.dim, teacher.space, bridge_to=teacher if bridged else None)
    x = cat_image(128)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert a.space == teacher.space and a.dim == teacher.dim
    assert a.config["head_init"] == ("imagenet-bridge" if bridged else "random:0")


@pytest.mark.parametrize("arch", ["mobilenetv2", "effnet-lite0"])
def test_classifier_bridge_puts_an_untrained_student_near_its_teacher(teacher, arch):
    # Asymmetric retrieval of real photographs among themselves: the student's vector of a photo must find
    # the teacher's vector of the same photo first, which a randomly initialised head cannot do.
    from engine.datasets.photos import pip_photos
    from engine.images import load_image

    photos = pip_photos()
    images = [load_image(p, 160) for p in photos]
    bridged = build_student(arch, teacher.dim, teacher.space, bridge_to=teacher)
    random_head = build_student(arch, teacher.dim, teacher.space)
    with torch.no_grad():
        t = torch.cat([teacher(x[None]) for x in images])
        hits = {}
        for name, s in (("bridged", bridged), ("random", random_head)):
            q = torch.cat([s(x[None]) for x in images])
            hits[name] = ((q @ t.T).argmax(dim=1) == torch.arange(len(images))).float().mean().item()
    assert hits["bridged"] >= 0.6 and hits["bridged"] > hits["random"] + 0.3, hits


def test_checkpoint_round_trip_keeps_outputs_and_config(tmp_path, teacher):
    s = build_student("effnet-lite0", teacher.dim, teacher.space, teacher=teacher.name)
    with torch.no_grad():
        s.head.p.fill_(2.5)
    s.head.set_whitening(torch.eye(teacher.dim)[:256] * 2, torch.zeros(256))
    path = save_checkpoint(s, tmp_path / "s.safetensors", extra={"epochs": 3})
    r = load_checkpoint(path)
    assert r.config["space"] == teacher.space and r.config["epochs"] == 3
    assert r.dim == 256 and r.config["pool_dim"] == teacher.dim  # a 256-d output over 1280 pooled channels
    x = cat_image(96)
    with torch.no_grad():
        torch.testing.assert_close(r(x), s(x))
    assert r(x).shape == (1, 256)


def test_checkpoints_from_before_the_projection_slot_still_load(tmp_path, teacher):
    import json

    from safetensors.torch import load_file, save_file

    from engine.models import CHECKPOINT_KEY, read_checkpoint_config

    s = build_student("mobilenetv2", teacher.dim, teacher.space, teacher=teacher.name, bridge_to=teacher)
    new = save_checkpoint(s, tmp_path / "new.safetensors")
    # What the code before the projection slot wrote (checked against that code by hand): the student's map
    # under head.whiten.*, its D as whiten_dim, no project_dim.
    config = read_checkpoint_config(new)
    assert config.pop("project_dim") == teacher.dim and config["whiten_dim"] is None
    config["whiten_dim"] = teacher.dim
    old = tmp_path / "old.safetensors"
    save_file({k.replace("head.project.", "head.whiten."): v for k, v in load_file(new).items()}, str(old),
              metadata={CHECKPOINT_KEY: json.dumps(config)})
    r = load_checkpoint(old)
    assert r.head.whiten is None and r.space == s.space and r.dim == teacher.dim
    torch.testing.assert_close(r.head.project.weight, s.head.project.weight, rtol=0, atol=0)
    x = cat_image(96)
    with torch.no_grad():
        torch.testing.assert_close(r(x), s(x), rtol=0, atol=0)
    # A teacher's whitening stays a whitening: only a student's old layer is its projection.
    assert load_checkpoint(save_checkpoint(teacher, tmp_path / "t.safetensors")).space == teacher.space


def test_students_without_packaged_weights_need_an_explicit_choice():
    with pytest.raises(EngineError, match="weights='random'"):
        build_student("resnet18", 1280, "x")
    torch.manual_seed(0)
    s = build_student("resnet18", 64, "x", weights="random")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = head_float64(s.trunk((x - mean) / std), 3.0, s.head.project.weight, s.head.project.bias)
        np.testing.assert_allclose(s(x).numpy(), want, atol=1e-6, rtol=0)
    # The head's map is the documented seeded draw: N(0, 1) / sqrt(C), C = 512 pooled channels.
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) / 512**0.5
    torch.testing.assert_close(s.head.project.weight, W, rtol=0, atol=0)


def test_unknown_names_and_bad_checkpoints(tmp_path):
    with pytest.raises(EngineError, match="unknown model"):
        load_encoder("alexnet-gem")
    with pytest.raises(EngineError, match="needs a target space"):
        load_encoder("mobilenetv2")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EngineError, match="neither a safetensors file nor a torch") as e:
        load_encoder(tmp_path / "bad.safetensors")
    assert e.value.path == str(tmp_path / "bad.safetensors")
    with pytest.raises(EngineError, match="not a safetensors checkpoint") as e:
        load_encoder(f"checkpoint:{tmp_path / 'bad.safetensors'}")  # named explicitly: read as what it is said to be
    assert e.value.path == str(tmp_path / "bad.safetensors")


def test_cirtorch_teacher_with_learned_whitening(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet101(weights=None)
    features = torch.nn.Sequential(*list(net.children())[:-2]).eval()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["pool.p"] = torch.tensor([2.8])
    rng = np.random.default_rng(0)
    P = rng.standard_normal((2048, 2048)).astype(np.float64) / 45
    m = rng.standard_normal((2048, 1)) / 100
    meta = {"architecture": "resnet101", "pooling": "gem", "whitening": False, "outputdim": 2048,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "Lw": {"retrieval-SfM-120k": {"ss": {"m": m, "P": P}, "ms": {"m": m, "P": P}}}}
    path = tmp_path / "teacher.bin"  # no telling suffix: the kind is read from the file (torch's legacy format)
    torch.save({"state_dict": state, "meta": meta}, path, _use_new_zipfile_serialization=False)
    enc = load_encoder(path)
    assert enc.dim == 2048 and enc.config["arch"] == "resnet101" and enc.name == "resnet101-gem"
    assert enc.space == space_id(enc) == build_teacher("resnet101-gem", path).space
    # The head's tensors keep their names (head.whiten holds Lw), so a cirtorch teacher keeps its space id.
    assert {k for k in enc.state_dict() if k.startswith("head.")} == {"head.p", "head.whiten.weight", "head.whiten.bias"}
    assert load_encoder(f"cirtorch:{path}").space == enc.space
    with pytest.raises(EngineError, match="resnet101 network .* not vgg16-gem"):
        build_teacher("vgg16-gem", path)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        fmap = features((x - enc.mean) / enc.std)
        g = fmap.clamp(min=1e-6).pow(2.8).mean((2, 3)).pow(1 / 2.8)
        g = g / g.norm()
        w = (torch.from_numpy(P).float() @ (g.T - torch.from_numpy(m).float())).T
        expected = w / w.norm()
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)
