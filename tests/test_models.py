"""Encoders: packaged weights load correctly, space ids, deterministic students, checkpoints, cirtorch teachers."""
import numpy as np
import pytest
import torch
from skimage import data

from engine.errors import EngineError
from engine.models import (
    ARCHS,
    _package_weights,
    build_student,
    build_teacher,
    load_checkpoint,
    load_encoder,
    save_checkpoint,
    space_id,
)


@pytest.fixture(scope="module")
def teacher():
    return build_teacher("effnet-lite2-gem")


def cat_image(size=224):
    x = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("arch", ["effnet-lite0", "effnet-lite2", "mobilenetv2"])
def test_packaged_imagenet_weights_classify_a_cat(arch):
    # The key rename / state-dict load is right only if the full classifier still sees a tabby cat (281-285).
    a = ARCHS[arch]
    trunk = a.make(_package_weights(arch)).eval()  # BatchNorm on running statistics
    x = (cat_image() - torch.tensor(a.mean).view(1, 3, 1, 1)) / torch.tensor(a.std).view(1, 3, 1, 1)
    with torch.no_grad():
        if arch.startswith("effnet"):
            logits = trunk.model(x)
        else:
            import torchvision

            m = torchvision.models.mobilenet_v2(weights=None)
            m.features = trunk
            m.load_state_dict(torch.load(_package_weights(arch), weights_only=True))
            m.eval()
            logits = m(x)
    assert 281 <= int(logits.argmax()) <= 285


def test_teacher_descriptors_are_unit_and_space_tracks_weights(teacher):
    with torch.no_grad():
        v = teacher(cat_image(160))
    assert v.shape == (1, 1280)
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
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


def test_students_without_packaged_weights_need_an_explicit_choice():
    with pytest.raises(EngineError, match="weights='random'"):
        build_student("resnet18", 1280, "x")
    s = build_student("resnet18", 64, "x", weights="random")
    with torch.no_grad():
        assert s(torch.rand(1, 3, 64, 64)).shape == (1, 64)


def test_unknown_names_and_bad_checkpoints(tmp_path):
    with pytest.raises(EngineError, match="unknown model"):
        load_encoder("alexnet-gem")
    with pytest.raises(EngineError, match="needs a target space"):
        load_encoder("mobilenetv2")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EngineError, match="bad.safetensors"):
        load_encoder(tmp_path / "bad.safetensors")


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
    path = tmp_path / "retrievalSfM120k-resnet101-gem-test.pth"
    torch.save({"state_dict": state, "meta": meta}, path)
    enc = load_encoder(path)
    assert enc.dim == 2048 and enc.config["arch"] == "resnet101"
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        fmap = features((x - enc.mean) / enc.std)
        g = fmap.clamp(min=1e-6).pow(2.8).mean((2, 3)).pow(1 / 2.8)
        g = g / g.norm()
        w = (torch.from_numpy(P).float() @ (g.T - torch.from_numpy(m).float())).T
        expected = w / w.norm()
        torch.testing.assert_close(enc(x), expected, rtol=1e-4, atol=1e-5)
