"""Decoding on the encoder's device (engine.device_decode) gives the host path's images and vectors, and leaves to the
host what it does not decode the same way: other formats, CMYK, truncated or refused JPEGs, decompression bombs.

The CPU runs torchvision's libjpeg-turbo decoder and the same torch resize the GPU runs; the CUDA case (skipped
without a GPU) compares nvJPEG with the host, whose chroma upsampling differs (nearest against interpolated).
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from engine.datasets.photos import pip_photos
from engine.device_decode import ORIENTATIONS, read_jpeg
from engine.encode import EncodeOptions, decode_in_order, encode_to_array, encode_to_store
from engine.errors import EngineError
from engine.images import MAX_PIXELS, read_image
from engine.models import build_student

CPU = torch.device("cpu")
BOX = [30, 20, 300, 250]


def save_jpeg(img: Image.Image, path, **kw):
    img.save(path, quality=90, **kw)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(path, expected on the device) for real photographs in every case the device path must tell apart."""
    root = tmp_path_factory.mktemp("photos")
    rocket = Image.fromarray(data.rocket())  # 640 x 427: orientations that swap the sides show
    # JPEGs (Hubble's with an Adobe marker), an RGB and a greyscale PNG
    pick = ("hubble_deep_field.jpg", "grace_hopper.jpg", "china.jpg", "chelsea.png", "camera.png")
    cases = [(p, p.suffix == ".jpg") for p in pip_photos() if p.name in pick]
    cases += [(save_jpeg(Image.fromarray(data.camera()), root / "grey.jpg"), True),
              (save_jpeg(rocket, root / "progressive.jpg", progressive=True), True),
              (save_jpeg(Image.fromarray(data.coffee()).convert("CMYK"), root / "cmyk.jpg"), False)]
    for k in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = k
        cases.append((save_jpeg(rocket, root / f"orientation{k}.jpg", exif=exif), True))
    return cases


@pytest.fixture(scope="module")
def student():
    return build_student("mobilenetv2", 64, "test-space")


def decoded(items, max_side, device=None, workers=1):
    return {i: (img, err) for i, img, err in decode_in_order(items, max_side, workers, 4, device)}


@pytest.mark.parametrize("max_side", [200, 700])
def test_device_path_gives_the_host_images(photos, max_side):
    items = [(p, None) for p, _ in photos] + [(p, BOX) for p, _ in photos]
    host, dev = decoded(items, max_side), decoded(items, max_side, CPU, workers=2)
    assert sorted(dev) == list(range(len(items)))
    for i, (p, _) in enumerate(items):
        (a, err_a), (b, err_b) = host[i], dev[i]
        assert err_a is err_b is None, p
        assert isinstance(b, torch.Tensor) == photos[i % len(photos)][1], p  # decoded on the device, or left to the host
        b = b.numpy() if isinstance(b, torch.Tensor) else b
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, p
        # Pillow and libjpeg-turbo decode alike; the resize rounds like Pillow's: a level at most, very rarely
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (p, diff.max(), (diff > 0).mean())


def test_orientations_are_exif_transposes():
    from PIL import ImageOps

    x = np.arange(2 * 3, dtype=np.uint8).reshape(2, 3) * 40
    for k, turn in ORIENTATIONS.items():
        img = Image.fromarray(x)
        img.getexif()[0x0112] = k
        want = np.asarray(ImageOps.exif_transpose(img))
        assert np.array_equal(turn(torch.from_numpy(x)[None])[0].numpy(), want), k


def test_vectors_equal_the_host_path_and_the_job_is_the_same(photos, student, tmp_path):
    items = [(p, None) for p, _ in photos[:5]] + [(p, BOX) for p, _ in photos[:5]]
    base = dict(max_side=160, batch_size=4, workers=2, progress=False, backend="torch")
    host, kept, _ = encode_to_array(student, items, EncodeOptions(decode="host", **base))
    dev, kept_dev, _ = encode_to_array(student, items, EncodeOptions(decode="device", **base))
    assert kept == kept_dev == list(range(len(items)))
    # the rare one-level pixel differences move this random-init head's unit vectors by up to 1.6e-3 (a trained
    # effnet-lite0 student: 3e-4 on 28 photos, 4e-4 on 192 views-benchmark images, same top-10 neighbours)
    assert np.abs(host - dev).max() < 5e-3
    np.testing.assert_array_equal(np.argsort(-host @ host.T, 1)[:, :3], np.argsort(-dev @ dev.T, 1)[:, :3])
    # where the images were decoded does not change the job: a store written one way is complete for the other
    names = [f"{i}" for i in range(len(items))]
    store = encode_to_store(student, items, names, tmp_path / "s", EncodeOptions(decode="host", **base))
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    again = encode_to_store(student, items, names, tmp_path / "s", EncodeOptions(decode="device", **base))
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before and again.count == store.count


def bomb(path, width=11000, height=10000):
    """A real small JPEG whose frame header claims width x height pixels (over MAX_PIXELS)."""
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, format="JPEG", quality=80)
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(raw))
    return path


def test_a_bomb_header_is_refused_before_decoding(tmp_path, monkeypatch):
    assert 11000 * 10000 > MAX_PIXELS
    path = bomb(tmp_path / "bomb.jpg")
    assert read_jpeg(path) is None  # never handed to the device's decoder
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: pytest.fail("a bomb was decoded"))
    monkeypatch.setattr("engine.device_decode.decode_jpegs", lambda *a: pytest.fail("a bomb was decoded"))
    (img, err), = decoded([(path, None)], 200, CPU).values()
    assert img is None and "pixel limit" in err and "bomb.jpg" in err


def test_bad_files_are_skipped_or_named_exactly_as_on_the_host(student, tmp_path, monkeypatch):
    good = save_jpeg(Image.fromarray(data.astronaut()), tmp_path / "good.jpg")
    raw = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 not a jpeg \xff\xd9")
    (tmp_path / "empty.jpg").write_bytes(b"")
    # a whole JPEG the device's decoder refuses (as nvJPEG refuses, e.g., arithmetic coding): the host decodes it
    refused = save_jpeg(Image.fromarray(data.coffee()), tmp_path / "refused.jpg")
    from torchvision import io as tvio

    real = tvio.decode_jpeg

    def picky(data, **kw):
        if any(len(d) == refused.stat().st_size for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(tvio, "decode_jpeg", picky)
    names = ["good", "truncated", "garbage", "empty", "missing", "refused", "good"]
    items = [(tmp_path / f"{n}.jpg", None) for n in names] + [(good, [900, 900, 1000, 1000])]  # an empty box
    base = dict(max_side=128, batch_size=3, workers=2, progress=False, backend="torch", skip_bad=True)
    host = encode_to_array(student, items, EncodeOptions(decode="host", **base))
    dev = encode_to_array(student, items, EncodeOptions(decode="device", **base))
    assert host[1] == dev[1] == [0, 5, 6]
    assert host[2] == dev[2] and [s["item"] for s in dev[2]] == [1, 2, 3, 4, 7]
    assert np.abs(host[0] - dev[0]).max() < 5e-3
    assert np.array_equal(read_image(refused, 128), decoded([(refused, None)], 128, CPU)[0][0])  # via the host
    for bad in (1, 2, 3, 4, 7):  # without --skip-bad: the same one-line error
        errors = []
        for decode in ("host", "device"):
            with pytest.raises(EngineError) as e:
                encode_to_array(student, [items[0], items[bad]], EncodeOptions(decode=decode, **{**base, "skip_bad": False}))
            errors.append(str(e.value))
        assert errors[0] == errors[1] and items[bad][0].name in errors[0]


def test_an_unknown_decode_place_is_refused():
    with pytest.raises(EngineError, match="decode must be one of"):
        EncodeOptions(decode="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_cuda_decoding_matches_the_host(photos):
    cuda = torch.device("cuda")
    items = [(p, None) for p, _ in photos] + [(p, BOX) for p, _ in photos]
    host, dev = decoded(items, 362), decoded(items, 362, cuda, workers=2)
    for i, (p, _) in enumerate(items):
        (a, _), (b, err) = host[i], dev[i]
        assert err is None and isinstance(b, torch.Tensor) == photos[i % len(photos)][1], p
        b = b.cpu().numpy() if isinstance(b, torch.Tensor) else b
        assert a.shape == b.shape, p
        # nvJPEG upsamples chroma by nearest neighbour: a simulation of it on these photos gave a mean of 0.6 levels
        assert np.abs(a.astype(float) - b).mean() < 2.5, p
    student = build_student("effnet-lite0", 1280, "s")
    base = dict(max_side=362, batch_size=4, workers=2, progress=False, backend="torch", device="cuda")
    h, _, _ = encode_to_array(student, items, EncodeOptions(decode="host", **base))
    d, _, _ = encode_to_array(student, items, EncodeOptions(decode="device", **base))
    # the simulation gave max |dv| 1.1e-2, min cosine 0.993 on unit vectors
    assert np.abs(h - d).max() < 3e-2 and (h * d).sum(1).min() > 0.98
    # each crop's nearest full photograph is the same wherever the host's margin is clear (5 of the 16 crops on the
    # CPU: the rocket's eight orientations are near ties)
    n = len(photos)
    sh, sd = h[n:] @ h[:n].T, d[n:] @ d[:n].T
    top = np.sort(sh, 1)
    clear = top[:, -1] - top[:, -2] > 0.05
    assert clear.sum() >= 4 and np.array_equal(sh.argmax(1)[clear], sd.argmax(1)[clear])
