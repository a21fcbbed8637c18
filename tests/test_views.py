"""The offline views benchmark: box geometry, labels, photo discovery, and the files build_views writes."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.datasets import geometry as geo
from engine.datasets.photos import (
    MIN_PHOTOS,
    OPENCV_DOC_DATA,
    OPENCV_DOC_PAIRS,
    default_photos,
    load_photo,
    photos_in,
    real_pairs,
    thumbnail,
    unseen,
)
from engine.datasets.revisited import load_gnd
from engine.datasets.views import DIFFICULTIES, build_views, split_scenes
from engine.errors import EngineError

SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg")
SMALL = dict(size=96, n_gallery=4, n_queries=2, n_train=4, train_fraction=0.4)
HAS_OPENCV_DOC = (OPENCV_DOC_DATA / "graf1.png").is_file()


# ---------------------------------------------------------------- geometry


def vis(box, H_view, H_query=np.eye(3), view=(100, 100), source=(100, 100), occluder=None):
    return geo.box_visibility(box, H_query, H_view, view, source, occluder)


def test_shifted_view_shows_the_part_of_the_box_left_in_frame():
    v = vis((0, 0, 50, 50), geo.translate(-25, 0))  # the box lands on x in [-25, 25]: half inside
    assert v.visible == pytest.approx(0.5)
    assert (v.scale, v.rotation, v.anisotropy) == pytest.approx((1.0, 0.0, 1.0))


def test_zoom_rotation_and_stretch_are_measured_at_the_box():
    assert vis((0, 0, 50, 50), geo.scale(2.0)).scale == pytest.approx(2.0)
    turned = vis((0, 0, 50, 50), geo.translate(100, 0) @ geo.rotate(90))
    assert (turned.visible, turned.rotation, turned.scale) == pytest.approx((1.0, 90.0, 1.0))
    stretched = vis((0, 0, 40, 40), np.diag([2.0, 1.0, 1.0]))  # 80 x 40 in the view
    assert (stretched.visible, stretched.scale, stretched.anisotropy) == pytest.approx((1.0, np.sqrt(2), 2.0))


def test_perspective_view_area_by_hand():
    # x' = x / (1 + x/100), y' = y / (1 + x/100): the box [0,50]^2 becomes the trapezoid
    # (0,0), (33.33,0), (33.33,33.33), (0,50) of area (50 + 33.33) / 2 * 33.33 = 1388.9
    H = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.01, 0, 1.0]])
    v = vis((0, 0, 50, 50), H)
    assert v.visible == pytest.approx(1.0)
    assert v.scale == pytest.approx(np.sqrt(1388.889 / 2500), rel=1e-4)


def test_occluder_hides_its_share_of_the_box():
    assert vis((0, 0, 50, 50), np.eye(3), occluder=(0, 0, 25, 50)).visible == pytest.approx(0.5)
    assert vis((0, 0, 50, 50), np.eye(3), occluder=(60, 60, 90, 90)).visible == pytest.approx(1.0)


def test_box_over_the_border_counts_only_photo_content():
    # the photo fills x in [50, 150] of the query; only the box's right half is photograph
    v = vis((0, 0, 100, 100), np.eye(3), H_query=geo.translate(50, 0), view=(100, 100))
    assert v.visible == pytest.approx(1.0)
    assert v.scale == pytest.approx(np.sqrt(0.5))


@pytest.mark.parametrize(
    "v, expected",
    [
        (geo.Visibility(0.9, 1.0, 0.0, 1.0), "easy"),
        (geo.Visibility(0.7, 0.5, -30.0, 1.5), "easy"),  # every limit is inclusive
        (geo.Visibility(0.9, 3.0, 0.0, 1.0), "hard"),  # zoomed 3x
        (geo.Visibility(0.9, 1.0, 45.0, 1.0), "hard"),  # rotated
        (geo.Visibility(0.9, 1.0, 0.0, 2.0), "hard"),  # strong perspective
        (geo.Visibility(0.5, 1.0, 0.0, 1.0), "hard"),  # half visible
        (geo.Visibility(0.2, 1.0, 0.0, 1.0), "junk"),  # a sliver
        (geo.Visibility(0.9, 5.0, 0.0, 1.0), "junk"),  # extreme zoom
        (geo.Visibility(0.0, 0.0, 0.0, 1.0), "junk"),  # not in view
    ],
)
def test_labels(v, expected):
    assert geo.label(v) == expected


def test_labels_from_shifted_views():
    shifted = [geo.label(vis((0, 0, 100, 100), geo.translate(-t, 0))) for t in (20, 60, 90)]
    assert shifted == ["easy", "hard", "junk"]


# ---------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A folder of five small real photographs (taken from scikit-image), as users would pass to --photos."""
    import skimage

    src = Path(skimage.__file__).parent / "data"
    out = tmp_path_factory.mktemp("photos")
    for name in SKIMAGE_PHOTOS:
        Image.fromarray(load_photo(src / name, 160)).save(out / (Path(name).stem + ".jpg"), quality=90)
    return out


def test_photos_in_lists_images_sorted(photo_dir):
    (photo_dir / "notes.txt").write_text("not a photo")
    found = photos_in(photo_dir)
    assert [p.name for p in found] == sorted(Path(n).stem + ".jpg" for n in SKIMAGE_PHOTOS)


def test_photos_in_missing_or_too_small_folder(tmp_path):
    with pytest.raises(EngineError, match="photos folder not found") as e:
        photos_in(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(EngineError, match=f"holds 0 photographs.*at least {MIN_PHOTOS}"):
        photos_in(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    with pytest.raises(EngineError, match="holds 1 photographs"):
        photos_in(tmp_path)


def test_unseen_drops_any_copy_of_a_folder_photo(photo_dir):
    import skimage

    originals = [Path(skimage.__file__).parent / "data" / n for n in SKIMAGE_PHOTOS]
    folder = photos_in(photo_dir)  # the same photographs, resized to 160 px and saved as JPEG
    assert unseen(originals, folder) == []
    assert unseen(originals, folder[:2]) == originals[2:]  # sorted names: astronaut, camera are seen
    assert float(thumbnail(originals[0]) @ thumbnail(folder[0])) > 0.98 > float(thumbnail(originals[0]) @ thumbnail(folder[1]))


def test_unreadable_photo_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(EngineError, match="cannot decode image") as e:
        load_photo(bad)
    assert str(bad) in str(e.value)


def test_default_photos_are_real_and_exclude_second_views():
    pip_only = default_photos(opencv_doc=None)
    assert len(pip_only) >= MIN_PHOTOS and all(p.is_file() for p in pip_only)
    photos = default_photos()
    assert photos[: len(pip_only)] == pip_only and photos == default_photos()
    seconds = {second for _, _, second, _, _ in OPENCV_DOC_PAIRS}
    assert not any(p.name in seconds for p in photos)
    assert len({p.resolve() for p in photos}) == len(photos)


@pytest.mark.skipif(not HAS_OPENCV_DOC, reason="opencv-doc is not installed")
def test_real_pairs_with_graf_homography():
    pairs = real_pairs()
    assert len(pairs) == len(OPENCV_DOC_PAIRS)
    graf = next(p for p in pairs if p[0] == "graf")
    H = graf[3]
    assert H.shape == (3, 3) and H[2, 2] == pytest.approx(1.0) and graf[4] is None
    assert all(H is None and label in ("easy", "hard") for name, _, _, H, label in pairs if name != "graf")


def test_split_pins_pair_scenes_to_test():
    photos = [Path(f"p{i}.jpg") for i in range(10)]
    split = split_scenes(photos, seed=3, train_fraction=0.4, pinned_test={photos[0], photos[1]})
    assert split[:2] == ["test", "test"] and split.count("train") == 4
    assert split == split_scenes(photos, seed=3, train_fraction=0.4, pinned_test={photos[0], photos[1]})


# ---------------------------------------------------------------- the built benchmark


@pytest.fixture(scope="module")
def built(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("views")
    info = build_views(out, photos=photos_in(photo_dir), seed=7, **SMALL)
    return out, info


def _scene(name: str) -> str:
    """The scene part of an image name: <split>_<scene>_<stem>_<kind><i> -> <scene>_<stem>."""
    return name.split("_", 1)[1].rsplit("_", 1)[0]


def test_same_seed_same_files(built, photo_dir, tmp_path):
    out, info = built
    again = build_views(tmp_path, photos=photos_in(photo_dir), seed=7, **SMALL)
    assert again == info
    for rel in ("test/gnd.pkl", "val/gnd.pkl", "train/db.pkl", "info.json"):
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel
    names = sorted(p.name for p in (out / "jpg").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "jpg").iterdir())
    assert all((tmp_path / "jpg" / n).read_bytes() == (out / "jpg" / n).read_bytes() for n in names)


def test_more_training_views_leave_the_test_split_unchanged(built, photo_dir, tmp_path, run_cli):
    out, info = built
    photo_args = ["--photos", photo_dir, "--seed", 7, "--difficulty", info["difficulty"]]
    more = {**SMALL, "n_train": SMALL["n_train"] + 5}
    again = build_views(tmp_path, photos=photos_in(photo_dir), seed=7, **more)
    assert again["counts"]["train"]["images"] == info["counts"]["train"]["images"] + 5 * info["counts"]["scenes"]["train"]
    assert (tmp_path / "test/gnd.pkl").read_bytes() == (out / "test/gnd.pkl").read_bytes()
    test_jpgs = sorted(p.name for p in (out / "jpg").glob("test_*"))
    assert all((tmp_path / "jpg" / n).read_bytes() == (out / "jpg" / n).read_bytes() for n in test_jpgs)
    code, _, err = run_cli("data", "views", "--out", tmp_path / "cli", *photo_args, "--train-views", 2, "--train-fraction", 0.5)
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "info.json").read_text())["counts"]["train"]["images"] == 2 * sum(
        p["split"] == "train" for p in json.loads((tmp_path / "cli" / "info.json").read_text())["photos"])


def test_given_training_photos_every_folder_photo_is_a_test_scene(built, photo_dir, tmp_path):
    out, info = built
    photos = photos_in(photo_dir)
    given = build_views(tmp_path, photos=photos[:3], train_photos=photos[3:], seed=7, **SMALL)
    assert [(p["path"], p["split"]) for p in given["photos"]] == [(str(p), "test") for p in photos[:3]] + [
        (str(p), "train") for p in photos[3:]]
    assert given["counts"]["test"]["gallery"] == 3 * SMALL["n_gallery"]
    assert given["counts"]["train"]["images"] == 2 * SMALL["n_train"]
    # A test scene's views depend on its photo's place only, not on which other photos train.
    both = [p["scene"] for p in info["photos"] if p["split"] == "test" and p["scene"] < 3]
    assert both  # scenes that test in both builds
    for s in both:
        for name in (out / "jpg").glob(f"test_{s:02d}_*"):
            assert (tmp_path / "jpg" / name.name).read_bytes() == name.read_bytes()
    with pytest.raises(EngineError, match="1 test and 4 training photographs given, .* at least 2 of each"):
        build_views(tmp_path / "few", photos=photos[:1], train_photos=photos[1:], **SMALL)


@pytest.mark.skipif(not HAS_OPENCV_DOC, reason="opencv-doc is not installed")
def test_pairs_are_left_out_when_their_first_views_train(photo_dir, tmp_path):
    trained = [OPENCV_DOC_DATA / OPENCV_DOC_PAIRS[0][1], *photos_in(photo_dir)[:1]]
    info = build_views(tmp_path, photos=photos_in(photo_dir)[1:3], train_photos=trained, **SMALL)
    assert info["counts"]["pairs"] is None and not (tmp_path / "pairs").exists()


def test_other_seed_other_views(built, photo_dir, tmp_path):
    out, _ = built
    build_views(tmp_path, photos=photos_in(photo_dir), seed=8, **SMALL)
    assert load_gnd(tmp_path / "test/gnd.pkl")["gnd"] != load_gnd(out / "test/gnd.pkl")["gnd"]


@pytest.mark.parametrize("split", ["test", "val"])
def test_gnd_structure(built, split):
    out, info = built
    cfg = load_gnd(out / split / "gnd.pkl")
    imlist, qimlist = cfg["imlist"], cfg["qimlist"]
    assert len(imlist) == len(set(imlist)) and not set(imlist) & set(qimlist)
    scenes = info["counts"]["scenes"]["test" if split == "test" else "train"]
    assert len(imlist) == scenes * SMALL["n_gallery"] and len(qimlist) == scenes * SMALL["n_queries"]
    for q, entry in zip(qimlist, cfg["gnd"]):
        labelled = entry["easy"] + entry["hard"] + entry["junk"]
        assert entry["easy"] + entry["hard"], f"{q} has no positive"
        assert len(labelled) == len(set(labelled))
        assert {_scene(imlist[i]) for i in labelled} == {_scene(q)}  # only views of its own scene are labelled
        with Image.open(out / "jpg" / f"{q}.jpg") as im:
            w, h = im.size
        x1, y1, x2, y2 = entry["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert all((out / "jpg" / f"{n}.jpg").is_file() for n in imlist + qimlist)


def test_db_structure_and_disjoint_scenes(built):
    out, info = built
    with open(out / "train" / "db.pkl", "rb") as f:
        db = pickle.load(f)
    val_gnd = load_gnd(out / "val" / "gnd.pkl")
    assert set(db["val"]["cids"]) == set(val_gnd["imlist"]) | set(val_gnd["qimlist"])
    for part in ("train", "val"):
        d = db[part]
        n = len(d["cids"])
        assert len(d["cluster"]) == n and len(d["qidxs"]) == len(d["pidxs"]) > 0
        for q, p in zip(d["qidxs"], d["pidxs"]):
            assert 0 <= q < n and 0 <= p < n and q != p and d["cluster"][q] == d["cluster"][p]
        assert all((out / "jpg" / f"{c}.jpg").is_file() for c in d["cids"])
    train_scenes = {_scene(c) for c in db["train"]["cids"]}
    test_gnd = load_gnd(out / "test" / "gnd.pkl")
    test_scenes = {_scene(n) for n in test_gnd["imlist"] + test_gnd["qimlist"]}
    assert train_scenes == {_scene(c) for c in db["val"]["cids"]} and not train_scenes & test_scenes
    by_split = {s: {p["path"] for p in info["photos"] if p["split"] == s} for s in ("train", "test")}
    assert len(by_split["train"]) == 2 and len(by_split["test"]) == 3  # 40% of five photos train
    assert json.loads((out / "info.json").read_text()) == info


def test_images_have_the_requested_size(built):
    out, _ = built
    for name in sorted((out / "jpg").iterdir())[:10]:
        with Image.open(name) as im:
            assert max(im.size) == SMALL["size"] and im.mode == "RGB"


@pytest.mark.skipif(not HAS_OPENCV_DOC, reason="opencv-doc is not installed")
def test_real_pairs_benchmark(photo_dir, tmp_path):
    build_views(tmp_path, photos=photos_in(photo_dir), n_gallery=2, n_queries=1, n_train=2, size=64)
    cfg = load_gnd(tmp_path / "pairs" / "gnd.pkl")
    assert len(cfg["qimlist"]) == len(cfg["imlist"]) == len(OPENCV_DOC_PAIRS)
    for k, entry in enumerate(cfg["gnd"]):
        assert entry["easy"] + entry["hard"] == [k] and entry["junk"] == []
        assert entry["bbx"][:2] == [0.0, 0.0] and max(entry["bbx"][2:]) == 64
    graf = cfg["gnd"][cfg["qimlist"].index("pairs_graf_1")]
    assert graf["hard"] == [cfg["imlist"].index("pairs_graf_2")]  # the 40-degree viewpoint stretches it 1.6x


@pytest.mark.parametrize("change, message", [
    ({"difficulty": "brutal"}, "unknown difficulty 'brutal'"),
    ({"train_fraction": 1.5}, "train_fraction .* must be between 0 and 1, exclusive, got 1.5"),
    ({"train_fraction": 1.0}, "train_fraction .* got 1.0"),
    ({"train_fraction": 0}, "train_fraction .* got 0"),
    ({"train_fraction": -0.2}, "train_fraction .* got -0.2"),
    ({"train_fraction": float("nan")}, "train_fraction .* got nan"),
    ({"train_fraction": "0.5"}, "train_fraction .* got '0.5'"),
    ({"n_train": 0}, "n_train .* at least 2 .* got 0"),
    ({"n_train": 1}, "n_train .* at least 2 \\(a training pair needs two views"),
    ({"n_train": -3}, "n_train .* got -3"),
    ({"n_gallery": 0}, "n_gallery .* at least 1, got 0"),
    ({"n_queries": 2.5}, "n_queries .* got 2.5"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
    ({"seed": 1.5}, "seed must be a non-negative integer, got 1.5"),
    ({"size": 8}, "size .* from 32 to 4096 pixels, got 8"),
    ({"size": 10**6}, "size .* got 1000000"),
])
def test_out_of_range_arguments_are_refused_before_writing(photo_dir, tmp_path, change, message):
    with pytest.raises(EngineError, match=message):
        build_views(tmp_path / "out", photos=photos_in(photo_dir), **{**SMALL, **change})
    assert not (tmp_path / "out").exists()


def test_bad_arguments(photo_dir, tmp_path):
    with pytest.raises(EngineError, match="at least 4"):
        build_views(tmp_path, photos=photos_in(photo_dir)[:2])
    assert set(DIFFICULTIES) == {"easy", "medium", "hard", "extreme"}

