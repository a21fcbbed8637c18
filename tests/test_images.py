"""Reading images: odd formats are converted, bad files are named, sizes are bounded."""
import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from engine.images import MIN_SIDE, fit_size, list_images, load_image


def test_grayscale_cmyk_16bit_and_alpha_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 50), np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), np.uint8), "RGBA").save(tmp_path / "alpha.png")
    for name in ("gray.png", "cmyk.jpg", "deep.png", "alpha.png"):
        x = load_image(tmp_path / name, max_side=100)
        assert x.shape == (3, 40, 50) and x.dtype.is_floating_point
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    deep = load_image(tmp_path / "deep.png", max_side=100)
    assert float(deep.max()) > 0.9  # 16-bit range scaled, not clipped to white or black


def test_resize_bounds_long_side_and_lifts_tiny_images(tmp_path):
    assert fit_size(1000, 500, 362) == (362, 181)
    assert fit_size(100, 50, 362) == (100, 50)  # never upscaled to max_side
    assert fit_size(8, 4, 362) == (2 * MIN_SIDE, MIN_SIDE)  # lifted above the network stride
    Image.new("RGB", (5, 3), (10, 20, 30)).save(tmp_path / "tiny.png")
    assert load_image(tmp_path / "tiny.png").shape[1] >= MIN_SIDE


def test_bbx_crop_happens_before_resize(tmp_path):
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 100:] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    x = load_image(tmp_path / "half.png", max_side=50, bbx=[100, 0, 200, 100])
    assert x.shape == (3, 50, 50) and float(x.min()) > 0.99
    with pytest.raises(EngineError, match="bounding box"):
        load_image(tmp_path / "half.png", bbx=[300, 0, 400, 10])


def test_bad_files_are_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(EngineError, match="broken.jpg: cannot decode"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(EngineError, match="missing.jpg: image not found"):
        load_image(tmp_path / "missing.jpg")


def test_list_images_from_folder_and_list_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    for n in ("b.jpg", "a.png"):
        Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / n)
    (tmp_path / "imgs" / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path / "imgs")] == ["a.png", "b.jpg"]
    (tmp_path / "list.txt").write_text("imgs/b.jpg\n# comment\n\nimgs/a.png\n")
    assert list_images(tmp_path / "list.txt") == [tmp_path / "imgs" / "b.jpg", tmp_path / "imgs" / "a.png"]
    with pytest.raises(EngineError, match="no such folder"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="holds no images"):
        list_images(tmp_path / "empty")
