"""Reading images: odd formats are converted, bad files are named, sizes are bounded."""
import numpy as np
import pytest
from PIL import Image

from engine.datasets.photos import load_photo
from engine.errors import EngineError
from engine.images import MIN_SIDE, fit_size, list_images, load_image, open_rgb, read_image
from engine.report.thumbs import thumbnails


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


def transparent_images(folder):
    """The same 2 x 3 blocks of 20 x 20 pixels in three transparent forms: opaque red, a half-transparent green,
    fully transparent pixels whose hidden colour is black or blue. Returns {file name: expected 2 x 3 RGB on white}."""
    blocks = np.array([[[255, 0, 0, 255], [0, 255, 0, 128], [0, 0, 0, 0]],
                       [[0, 0, 255, 0], [255, 0, 0, 255], [0, 0, 0, 0]]], np.uint8)
    rgba = blocks.repeat(20, axis=0).repeat(20, axis=1)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=-1)
    Image.fromarray(la, "LA").save(folder / "la.png")
    pal = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    index_of_black = pal.getpixel((59, 0))
    pal.save(folder / "palette.png", transparency=index_of_black)  # black pixels (the last column of blocks) transparent
    white = [255, 255, 255]
    half_green = [127, 255, 127]
    return {
        "rgba.png": [[[255, 0, 0], half_green, white], [white, [255, 0, 0], white]],
        "la.png": [[[255] * 3, [127] * 3, white], [white, [255] * 3, white]],
        "palette.png": [[[255, 0, 0], [0, 255, 0], white], [[0, 0, 255], [255, 0, 0], white]],
    }


def test_transparency_is_composited_on_white_by_every_reader(tmp_path):
    for name, expected in transparent_images(tmp_path).items():
        decoded = np.asarray(open_rgb(tmp_path / name)).astype(int)
        assert decoded.shape == (40, 60, 3)
        assert np.abs(decoded[::20, ::20] - np.array(expected)).max() <= 1, name
        # the views benchmark's photographs and the encoders' input come from the same decoder
        assert np.array_equal(load_photo(tmp_path / name), decoded)
        assert np.array_equal(read_image(tmp_path / name, max_side=4096), decoded)


def test_thumbnails_use_the_same_decoder(tmp_path):
    big = np.zeros((64, 96, 4), np.uint8)  # transparent black everywhere except an opaque red square
    big[16:48, 16:48] = [255, 0, 0, 255]
    Image.fromarray(big, "RGBA").save(tmp_path / "a.png")
    (name,) = thumbnails([(tmp_path / "a.png", None, 48)], tmp_path / "thumbs")
    thumb = np.asarray(Image.open(tmp_path / "thumbs" / name)).astype(int)
    assert thumb.shape == (32, 48, 3)
    assert (thumb[2, 40] > 240).all()  # a transparent corner shows white, as the encoders see it, not black
    assert thumb[16, 16, 0] > 200 and thumb[16, 16, 1:].max() < 60
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert thumbnails([(tmp_path / "bad.png", None, 48)], tmp_path / "thumbs") == [None]
    assert sorted(p.name for p in (tmp_path / "thumbs").iterdir()) == [name]  # nothing half-written left


def test_exif_orientation_is_applied_everywhere(tmp_path):
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = np.asarray(open_rgb(tmp_path / "turned.jpg"))
    assert upright.shape == (80, 40, 3) and upright[5:35].mean() > 200 and upright[45:].mean() < 50
    assert load_photo(tmp_path / "turned.jpg").shape == (80, 40, 3)
    (name,) = thumbnails([(tmp_path / "turned.jpg", None, 40)], tmp_path / "thumbs")
    assert Image.open(tmp_path / "thumbs" / name).size == (20, 40)
