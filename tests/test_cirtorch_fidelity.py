"""A cirtorch teacher's descriptors equal cirtorch's own computation, restated here from its code
(cirtorch/networks/imageretrievalnet.py `ImageRetrievalNet.forward`, `extract_ss`, `extract_ms`; cirtorch/layers
`GeM`, `L2N`; cirtorch/utils/whiten.py `whitenapply`; the msp choice of cirtorch's and AML's test.py), on a
cirtorch-format .pth with random weights and a random meta['Lw'].

The restatement follows cirtorch step by step: ImageNet normalisation first, the resize of the normalised
tensor, per-scale network output L2N(GeM(features)), the scales combined as (mean_s v_s^msp)^(1/msp) / norm,
and only then whitenapply (numpy, float64, the norm plus 1e-6) with the 'ms' Lw (the 'ss' one at one scale).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from engine.cirtorch import load_teacher
from engine.encode import EncodeOptions, encode_to_array
from engine.multiscale import PROTOCOL_SCALES, describe

P_GEM = 2.8
CIRTORCH_EPS = 1e-6  # GeM's clamp and L2N's denominator term in cirtorch/layers/functional.py
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CIRTORCH_MS = [1, 1 / 2 ** (1 / 2), 1 / 2]  # the multi-scale list of cirtorch's and AML's test.py help


class CirtorchNet(torch.nn.Module):
    """cirtorch's ImageRetrievalNet for 'vgg16-gem' without a whiten layer: features -> GeM -> L2N."""

    def __init__(self, features: torch.nn.Module, p: float):
        super().__init__()
        self.features, self.p = features, p

    def forward(self, x):  # x: normalised N x 3 x H x W -> D x N (cirtorch returns columns)
        o = self.features(x)
        o = torch.nn.functional.avg_pool2d(o.clamp(min=CIRTORCH_EPS).pow(self.p), (o.size(-2), o.size(-1))).pow(1.0 / self.p)
        o = o / (torch.norm(o, p=2, dim=1, keepdim=True) + CIRTORCH_EPS)
        return o.squeeze(-1).squeeze(-1).permute(1, 0)


def extract_ms(net, x, ms, msp):
    """cirtorch's extract_ms for one normalised image (1 x 3 x H x W) -> D."""
    v = torch.zeros(net(x).shape[0])
    for s in ms:
        xs = x.clone() if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        v += net(xs).pow(msp).squeeze()
    v /= len(ms)
    v = v.pow(1.0 / msp)
    return v / v.norm()


def whitenapply(X, m, P):
    """cirtorch's whitenapply on D x N columns."""
    X = np.dot(P, X - m)
    return X / (np.linalg.norm(X, ord=2, axis=0, keepdims=True) + 1e-6)


@pytest.fixture(scope="module")
def cirtorch_file(tmp_path_factory):
    """A cirtorch-format vgg16-gem .pth (random features, p = 2.8) with distinct random 'ss' and 'ms' Lw; the
    cirtorch network of the same weights."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg
    features = torch.nn.Sequential(*list(vgg.make_layers(vgg.cfgs["D"]).children())[:-1]).eval()  # vgg16's features
    rng = np.random.default_rng(0)
    lw = {key: {"m": rng.standard_normal((512, 1)) / 30, "P": rng.standard_normal((512, 512)) / 20} for key in ("ss", "ms")}
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["pool.p"] = torch.tensor([P_GEM])
    meta = {"architecture": "vgg16", "pooling": "gem", "whitening": False, "outputdim": 512, "mean": MEAN, "std": STD,
            "Lw": {"retrieval-SfM-120k": lw}}
    path = tmp_path_factory.mktemp("cirtorch") / "retrievalSfM120k-vgg16-gem-test.pth"
    torch.save({"state_dict": state, "meta": meta}, path)
    return path, CirtorchNet(features, P_GEM).eval(), lw


@pytest.fixture(scope="module")
def teachers(cirtorch_file):
    """Our encoder of the file, with its 'ss' and with its 'ms' Lw."""
    return {key: load_teacher(cirtorch_file[0], lw=key) for key in ("ss", "ms")}


def photo_like(seed: int, h: int, w: int) -> torch.Tensor:
    """1 x 3 x h x w in [0, 1] with structure at several scales (smoothed noise), so that scales differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 8, w // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def reference(net, images, ms, lw) -> np.ndarray:
    """cirtorch: extract_ss / extract_ms per image (msp = the net's GeM p at several scales), then whitenapply."""
    msp = P_GEM if len(ms) > 1 else 1
    cols = []
    with torch.no_grad():
        for x in images:
            xn = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            cols.append((net(xn).squeeze() if len(ms) == 1 else extract_ms(net, xn, ms, msp)).numpy())
    return whitenapply(np.stack(cols, axis=1), lw["m"], lw["P"]).T


@pytest.mark.parametrize("lw_key,scales,ms", [("ms", PROTOCOL_SCALES, CIRTORCH_MS), ("ss", (1.0,), [1])])
def test_cirtorch_teacher_descriptors_equal_cirtorch(cirtorch_file, teachers, lw_key, scales, ms):
    path, net, lw = cirtorch_file
    enc = teachers[lw_key]
    images = [photo_like(1, 72, 96), photo_like(2, 96, 68)]
    want = reference(net, images, ms, lw[lw_key])
    got = np.concatenate([describe(enc, x, scales).numpy() for x in images])
    diff = np.abs(got - want).max()
    print(f"cirtorch {lw_key} Lw at scales {scales}: max abs diff {diff:.2e}")
    assert diff < 1e-5


def test_the_scales_are_the_protocol_and_whitening_follows_their_combination(cirtorch_file, teachers):
    path, net, lw = cirtorch_file
    assert PROTOCOL_SCALES == (1.0, 2**-0.5, 0.5) and np.isclose(PROTOCOL_SCALES[1], CIRTORCH_MS[1], rtol=1e-15, atol=0)
    enc = teachers["ms"]
    x = photo_like(3, 80, 80)
    want = reference(net, [x], CIRTORCH_MS, lw["ms"])
    # The old order (whiten each scale, then combine) is measurably another descriptor: the test above can fail.
    per_scale = sum(enc(torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                        if s != 1 else x) for s in PROTOCOL_SCALES).detach()
    per_scale = (per_scale / per_scale.norm()).numpy()
    assert np.abs(per_scale - want).max() > 10 * 1e-5  # ten times the tolerance of the equality above


def test_encode_pipeline_gives_cirtorch_multiscale_vectors(cirtorch_file, teachers, tmp_path):
    # The path `engine encode --scales` takes: decoded files, a runner over the network before the whitening.
    from PIL import Image

    path, net, lw = cirtorch_file
    enc = teachers["ms"]
    files = []
    for i, (h, w) in enumerate([(72, 96), (96, 72)]):
        arr = (photo_like(10 + i, h, w)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(arr).save(files[-1])
    opts = EncodeOptions(max_side=96, workers=0, scales=PROTOCOL_SCALES, backend="torch", progress=False)
    got, kept, skipped = encode_to_array(enc, [(f, None) for f in files], opts)
    assert kept == [0, 1] and not skipped
    from engine.images import load_image

    want = reference(net, [load_image(f, 96)[None] for f in files], CIRTORCH_MS, lw["ms"])
    assert np.abs(got - want).max() < 1e-5


def test_the_source_names_which_lw(cirtorch_file, teachers, tmp_path, run_cli):
    """`cirtorch-ms:PATH` is the file with its multi-scale Lw, `cirtorch:PATH` and a plain PATH with its
    single-scale one; `engine encode --model cirtorch-ms:PATH --scales 1,0.707,0.5` gives cirtorch's vectors."""
    from PIL import Image

    from engine.models import load_encoder
    from engine.store import open_store

    path, net, lw = cirtorch_file
    for source, key in ((f"cirtorch-ms:{path}", "ms"), (f"cirtorch:{path}", "ss"), (str(path), "ss")):
        enc = load_encoder(source)
        assert torch.equal(enc.head.whiten.weight, teachers[key].head.whiten.weight), source
        assert enc.space == teachers[key].space, source
    assert teachers["ms"].space != teachers["ss"].space

    images = tmp_path / "images"
    images.mkdir()
    files = []
    for i, (h, w) in enumerate([(72, 96), (96, 72)]):
        arr = (photo_like(20 + i, h, w)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        files.append(images / f"im{i}.png")
        Image.fromarray(arr).save(files[-1])
    out = tmp_path / "ms.store"
    code, _, err = run_cli("encode", "--model", f"cirtorch-ms:{path}", "--images", images, "--out", out,
                           "--scales", "1,0.707,0.5", "--max-side", "96", "--workers", "0")
    assert code == 0, err
    store = open_store(out)
    from engine.images import load_image

    want = reference(net, [load_image(f, 96)[None] for f in files], CIRTORCH_MS, lw["ms"])
    got = store.vectors()[[store.names().index(n) for n in sorted(store.names())]]
    assert store.space == teachers["ms"].space
    assert np.abs(got - want).max() < 1e-5
