"""The offline views benchmark: instance retrieval built from real photographs, no download.

Each photograph is a scene. Gallery images and queries are random views of it: a known
homography (viewpoint, zoom, rotation, shift) and photometric changes (lighting, brightness,
contrast, colour, blur, noise, occlusion, JPEG). Because every homography is known, each
query box's visibility in each gallery view of its scene gives exact easy / hard / junk labels
(`geometry.LabelRule`); views of other scenes are negatives. Scenes are split into training
and test scenes that never share a photograph.

Written under `out/` (names without extension, images as `jpg/<name>.jpg`):
  test/gnd.pkl    revisited-Oxford ground truth over the test scenes;
  val/gnd.pkl     the same over validation scenes (model selection): a share of the training side's
                  photographs held out from training; with fewer than 3 such photographs (or
                  val_fraction 0), fresh views of the training scenes instead (info.json: "val_split");
  train/db.pkl    SfM-120k format {'train'|'val': {'cids', 'cluster', 'qidxs', 'pidxs'}} over the
                  training scenes ('val' = the val/gnd.pkl images), pairs = views that truly match;
  pairs/gnd.pkl   opencv-doc's real two-view pairs (when installed): first views query the second views;
  info.json       seed, difficulty, photos and their split, counts.
The same arguments give byte-identical pickles.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import EngineError
from ..files import write_text
from ..images import MIN_SIDE
from ..pickles import write_pickle
from . import geometry as geo
from .photos import MIN_PHOTOS, OPENCV_DOC_DATA, default_photos, fit, load_photo, real_pairs


@dataclass(frozen=True)
class Difficulty:
    """Ranges of the random view changes; each value is drawn uniformly in [-x, x] (or [0, x]) per image.

    zoom: log2 of the zoom factor; rotation: in-plane degrees; perspective: corner displacement
    as a fraction of the photo's longer side; shift: offset of the viewed point from the photo centre
    as a fraction of each side; brightness: additive, fraction of 255; contrast, colour: log2 of the
    contrast factor and of per-channel gains; blur: Gaussian sigma in pixels; noise: sigma in 0-255
    units; jpeg: lowest JPEG quality (the highest is 95); lighting: strength of a multiplicative
    illumination gradient across the frame; occlusion: probability that a gallery view gets an
    occluding rectangle of up to `occluder` of the frame's area.
    """

    zoom: float
    rotation: float
    perspective: float
    shift: float
    brightness: float
    contrast: float
    colour: float
    blur: float
    noise: float
    jpeg: int
    lighting: float
    occlusion: float
    occluder: float


# Pretrained effnet-lite2-gem teacher, Medium mAP on test/gnd.pkl of the default photos (pip + opencv-doc,
# seed 0): medium 78.7, hard 67.4; pip photos only: medium 89.2. "medium" is the default because it lands
# in the 60-85 band where training can still show a gain; "easy" is close to 100 for any pretrained network.
DIFFICULTIES = {
    "easy": Difficulty(0.5, 10, 0.06, 0.15, 0.10, 0.25, 0.10, 1.0, 4, 70, 0.15, 0.2, 0.2),
    "medium": Difficulty(1.3, 45, 0.22, 0.31, 0.26, 0.65, 0.32, 2.8, 12, 28, 0.52, 0.6, 0.35),
    "hard": Difficulty(1.4, 60, 0.23, 0.32, 0.27, 0.7, 0.35, 3.0, 13, 25, 0.55, 0.7, 0.4),
    "extreme": Difficulty(1.8, 120, 0.28, 0.38, 0.32, 0.9, 0.45, 4.0, 18, 20, 0.65, 0.85, 0.45),
}
DEFAULT_DIFFICULTY = "medium"
MIN_CONTENT = 0.6  # a view must be at least this much photograph (the rest is a plain border)
BOX_SIDES = (0.35, 0.8)  # a query box spans this fraction range of each side of the query image
SPLITS = {"train": 1, "val": 2, "test": 3}  # seeds the per-scene generators, so splits draw independently
MAX_SIZE = 4096  # longest view side: above every packaged photograph's own size, so nothing is gained beyond it


# ---------------------------------------------------------------- views: geometry


def sample_homography(rng: np.random.Generator, source_size, view_size, d: Difficulty, tries: int = 100) -> np.ndarray:
    """A random source -> view homography (3x3 float64) under difficulty `d`.

    Composed right to left: move the viewed point c to the origin, normalise by the photo's longer
    side L, perspective (the corners of a unit square displaced), zoom (with the photo fitted to the
    view), rotation, then centre in the view. Redrawn until the photo stays in front of the camera
    and fills at least MIN_CONTENT of the view.
    """
    (sw, sh), (vw, vh) = source_size, view_size
    L, fit = max(sw, sh), min(vw / sw, vh / sh)
    square = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]], dtype=np.float32)
    for _ in range(tries):
        c = np.array([sw, sh]) * (0.5 + rng.uniform(-d.shift, d.shift, 2))
        corners = square + rng.uniform(-d.perspective, d.perspective, (4, 2)).astype(np.float32)
        P = cv2.getPerspectiveTransform(square, corners)
        P = geo.translate(*-geo.apply(P, [[0.0, 0.0]])[0]) @ P  # keep the viewed point at the view's centre
        zoom = 2.0 ** rng.uniform(-d.zoom, d.zoom)
        angle = rng.uniform(-d.rotation, d.rotation)
        H = (
            geo.translate(vw / 2, vh / 2) @ geo.rotate(angle) @ geo.scale(zoom * fit * L) @ P
            @ geo.scale(1 / L) @ geo.translate(-c[0], -c[1])
        )
        if (geo.depth(H, geo.rect(source_size)) > 0.05).all() and geo.covered_fraction(
            geo.rect(view_size), geo.apply(H, geo.rect(source_size))
        ) >= MIN_CONTENT:
            return H
    raise EngineError(f"could not draw a view filling {MIN_CONTENT:.0%} of the frame in {tries} tries")


def sample_box(rng: np.random.Generator, H: np.ndarray, source_size, view_size, tries: int = 100):
    """A query box (x1, y1, x2, y2) in the view, of sides in BOX_SIDES, over photograph only (>= 98%); None if none found."""
    vw, vh = view_size
    content = geo.apply(H, geo.rect(source_size))
    for _ in range(tries):
        w, h = rng.uniform(*BOX_SIDES, 2) * (vw, vh)
        x1, y1 = rng.uniform(0, vw - w), rng.uniform(0, vh - h)
        box = (round(x1, 1), round(y1, 1), round(x1 + w, 1), round(y1 + h, 1))
        if geo.covered_fraction(geo.box_polygon(box), content) >= 0.98:
            return box
    return None


def sample_occluder(rng: np.random.Generator, view_size, d: Difficulty):
    """An occluding box (x1, y1, x2, y2) of 5% to d.occluder of the frame, with probability d.occlusion; else None."""
    if d.occluder <= 0.05 or rng.uniform() >= d.occlusion:
        return None
    vw, vh = view_size
    frac = rng.uniform(0.05, d.occluder)
    aspect = 2.0 ** rng.uniform(-1, 1)
    w = min(vw, np.sqrt(frac * vw * vh * aspect))
    h = min(vh, frac * vw * vh / w)
    x1, y1 = rng.uniform(0, vw - w), rng.uniform(0, vh - h)
    return (float(x1), float(y1), float(x1 + w), float(y1 + h))


# ---------------------------------------------------------------- views: pixels


def warp(source: np.ndarray, H: np.ndarray, view_size, fill: float) -> np.ndarray:
    """Render the view (vh, vw, 3) uint8 of an RGB photo through H, border filled with grey `fill`.

    Strong zoom-outs are taken from a Gaussian pyramid level so they do not alias.
    """
    vw, vh = view_size
    sh, sw = source.shape[:2]
    while abs(np.linalg.det(geo.local_affine(H, (sw / 2, sh / 2)))) < 0.36 and min(sh, sw) >= 64:
        source = cv2.pyrDown(source)  # a pixel i of the half image is pixel 2i of the full one
        H = H @ geo.scale(2.0)
        sh, sw = source.shape[:2]
    return cv2.warpPerspective(
        source, H, (vw, vh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(fill, fill, fill)
    )


def photometric(rng: np.random.Generator, image: np.ndarray, d: Difficulty, occluder=None) -> np.ndarray:
    """Random lighting, brightness, contrast, colour, blur, noise (and the occluder, if any) on (h, w, 3) uint8."""
    h, w = image.shape[:2]
    x = image.astype(np.float32)
    if d.lighting > 0:
        a, t = rng.uniform(0, d.lighting), rng.uniform(0, 2 * np.pi)
        gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * np.float32(np.cos(t))
        gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * np.float32(np.sin(t))
        field = 1 + np.float32(a / np.sqrt(2)) * (gx + gy)
        x = cv2.multiply(x, cv2.merge([field, field, field]))
    # contrast about the mean, brightness and per-channel colour gains folded into one affine map per channel
    k = 2.0 ** rng.uniform(-d.contrast, d.contrast)
    offset = float(x.mean()) * (1 - k) + 255 * rng.uniform(-d.brightness, d.brightness)
    gains = 2.0 ** rng.uniform(-d.colour, d.colour, 3)
    x = cv2.transform(x, np.c_[np.diag(k * gains), offset * gains].astype(np.float32))
    sigma = rng.uniform(0, d.blur)
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    # OpenCV's normal generator is twice as fast as numpy's; seeding it from rng keeps the output reproducible
    cv2.setRNGSeed(int(rng.integers(2**31)))
    noise = np.empty_like(x)
    cv2.randn(noise, 0.0, float(rng.uniform(0, d.noise)))
    x += noise
    if occluder is not None:
        x1, y1, x2, y2 = (round(v) for v in occluder)
        x[y1:y2, x1:x2] = rng.uniform(0, 255, 3).astype(np.float32) + noise[y1:y2, x1:x2] * 4
    np.clip(x, 0, 255, out=x)
    return (x + 0.5).astype(np.uint8)


def save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    """Write an (h, w, 3) uint8 RGB array as a baseline JPEG of the given quality."""
    Image.fromarray(image).save(path, format="JPEG", quality=int(quality))


# ---------------------------------------------------------------- scenes and splits


@dataclass
class View:
    """One generated image: its name, source -> view homography, size (w, h), query box, occluder box."""

    name: str
    H: np.ndarray
    size: tuple[int, int]
    box: tuple | None = None
    occluder: tuple | None = None


def frame_size(source: np.ndarray, size: int) -> tuple[int, int]:
    """(w, h) of a view of a photo: its aspect ratio at longer side `size`."""
    h, w = source.shape[:2]
    f = size / max(h, w)
    return max(1, round(w * f)), max(1, round(h * f))


def render(rng: np.random.Generator, source: np.ndarray, view: View, d: Difficulty, jpg_dir: Path) -> None:
    """Draw the pixels of `view` from `source` and write jpg_dir/<name>.jpg."""
    image = warp(source, view.H, view.size, fill=float(rng.uniform(0, 255)))
    image = photometric(rng, image, d, view.occluder)
    save_jpeg(image, jpg_dir / f"{view.name}.jpg", rng.integers(d.jpeg, 96))


def scene_views(
    rng: np.random.Generator, source: np.ndarray, prefix: str, n: int, d: Difficulty, size: int, kind: str, occlude: bool
) -> list[View]:
    """n random views (homography, and occluder if `occlude`) named <prefix>_<kind><i>; no pixels yet."""
    src, vs = (source.shape[1], source.shape[0]), frame_size(source, size)
    views = []
    for i in range(n):
        H = sample_homography(rng, src, vs, d)
        views.append(View(f"{prefix}_{kind}{i:02d}", H, vs, occluder=sample_occluder(rng, vs, d) if occlude else None))
    return views


def visibility(query: View, gallery: View, source_size) -> geo.Visibility:
    """How the query's box shows in a gallery view of the same scene."""
    return geo.box_visibility(query.box, query.H, gallery.H, gallery.size, source_size, gallery.occluder)


def scene_queries(
    rng: np.random.Generator, source: np.ndarray, prefix: str, n: int, d: Difficulty, size: int, gallery: list[View],
    rule: geo.LabelRule, tries: int = 50,
) -> list[tuple[View, dict]]:
    """n queries with boxes, each with its labels {'easy', 'hard', 'junk'} as positions in `gallery`.

    A query is redrawn until at least one gallery view is a positive (easy or hard).
    """
    src, vs = (source.shape[1], source.shape[0]), frame_size(source, size)
    out = []
    for i in range(n):
        for _ in range(tries):
            q = View(f"{prefix}_q{i:02d}", sample_homography(rng, src, vs, d), vs)
            q.box = sample_box(rng, q.H, src, vs)
            if q.box is None:
                continue
            labels = {geo.EASY: [], geo.HARD: [], geo.JUNK: []}
            for j, g in enumerate(gallery):
                labels[geo.label(visibility(q, g, src), rule)].append(j)
            if labels[geo.EASY] or labels[geo.HARD]:
                out.append((q, labels))
                break
        else:
            raise EngineError(f"no query of scene {prefix} has a positive in {tries} draws; use a lower difficulty")
    return out


def matching_pairs(views: list[View], source_size, rule: geo.LabelRule) -> list[tuple[int, int]]:
    """Ordered (i, j) positions of views whose whole frame i shows in view j as an easy or hard match."""
    pairs = []
    for i, a in enumerate(views):
        whole = View(a.name, a.H, a.size, box=(0.0, 0.0, float(a.size[0]), float(a.size[1])))
        for j, b in enumerate(views):
            if i != j and geo.label(visibility(whole, b, source_size), rule) != geo.JUNK:
                pairs.append((i, j))
    return pairs


def split_scenes(photos: list[Path], seed: int, train_fraction: float, pinned_test: set[Path],
                 val_fraction: float = 0.0) -> list[str]:
    """'train', 'val' or 'test' per photo: a seeded shuffle of the unpinned photos, the first `train_fraction` of all
    to the training side, of which the last `val_fraction` (rounded) become validation scenes.

    Pinned photos (first views of the real pairs) are always test scenes, so the pairs benchmark stays unseen.
    At least one scene goes to each side when there are two or more free photos. Validation scenes are taken
    from the training side, so the test scenes do not depend on val_fraction; only when at least two training
    scenes remain (mining needs another cluster), else there are none.
    """
    free = [i for i, p in enumerate(photos) if p not in pinned_test]
    order = np.random.default_rng([seed, 0]).permutation(len(free))
    n_train = min(max(1, round(train_fraction * len(photos))), len(free) - 1)
    side = [free[k] for k in order[:n_train]]
    val = validation_scenes(side, val_fraction)
    return ["val" if i in val else "train" if i in side else "test" for i in range(len(photos))]


def validation_scenes(side: list[int], val_fraction: float) -> set[int]:
    """The scenes held out for validation from a training side (indices in a seeded order): its last
    `val_fraction` (rounded, at least one), only when at least two training scenes remain (mining needs another
    cluster), else none."""
    n_val = max(0, min(max(1, round(val_fraction * len(side))), len(side) - 2)) if val_fraction > 0 else 0
    return set(side[len(side) - n_val:])


def _rng(seed: int, split: str, scene: int) -> np.random.Generator:
    """One random stream per (seed, split, scene): a scene's views do not depend on the other scenes."""
    return np.random.default_rng([seed, SPLITS[split], scene])


def _stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", path.stem).strip("-") or "photo"


# ---------------------------------------------------------------- the benchmark


def _gnd_set(rng, source, prefix, n_gallery, n_queries, d, size, rule, jpg_dir):
    """Gallery views and labelled queries of one scene, rendered; returns (gallery, [(query, labels)])."""
    gallery = scene_views(rng, source, prefix, n_gallery, d, size, "g", occlude=True)
    queries = scene_queries(rng, source, prefix, n_queries, d, size, gallery, rule)
    for v in gallery + [q for q, _ in queries]:
        render(rng, source, v, d, jpg_dir)
    return gallery, queries


def _gnd(scenes: list[tuple[list[View], list[tuple[View, dict]]]]) -> dict:
    """Revisited-Oxford dict from per-scene (gallery, labelled queries); label positions become imlist indices."""
    imlist, qimlist, gnd = [], [], []
    for gallery, queries in scenes:
        offset = len(imlist)
        imlist += [g.name for g in gallery]
        for q, labels in queries:
            qimlist.append(q.name)
            entry = {"bbx": [float(v) for v in q.box]}
            entry.update({k: [offset + j for j in labels[k]] for k in (geo.EASY, geo.HARD, geo.JUNK)})
            gnd.append(entry)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _db(scenes: list[tuple[list[str], list[tuple[int, int]]]]) -> dict:
    """SfM-120k split {'cids', 'cluster', 'qidxs', 'pidxs'} from per-scene (image names, position pairs)."""
    cids, cluster, qidxs, pidxs = [], [], [], []
    for c, (names, pairs) in enumerate(scenes):
        offset = len(cids)
        cids += names
        cluster += [c] * len(names)
        qidxs += [offset + i for i, _ in pairs]
        pidxs += [offset + j for _, j in pairs]
    return {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}


def _pairs_gnd(size: int, rule: geo.LabelRule, jpg_dir: Path, data_dir: Path) -> dict | None:
    """The real two-view pairs as a small revisited-Oxford benchmark; None without opencv-doc.

    Queries are the first views (box: the whole image), the gallery the second views. The label of
    the second view comes from `rule` where a ground-truth homography is known (graf), otherwise
    it is the dataset's expected one (`photos.OPENCV_DOC_PAIRS`).
    """
    pairs = real_pairs(data_dir)
    if not pairs:
        return None
    imlist, qimlist, gnd = [], [], []
    for k, (name, first, second, H, expected) in enumerate(pairs):
        a, b = load_photo(first), load_photo(second)
        fa, fb = size / max(a.shape[:2]), size / max(b.shape[:2])
        a, b = fit(a, size), fit(b, size)
        for image, role in ((a, "1"), (b, "2")):
            save_jpeg(image, jpg_dir / f"pairs_{name}_{role}.jpg", 95)
        qimlist.append(f"pairs_{name}_1")
        imlist.append(f"pairs_{name}_2")
        sa, sb = (a.shape[1], a.shape[0]), (b.shape[1], b.shape[0])
        box = (0.0, 0.0, float(sa[0]), float(sa[1]))
        labels = {geo.EASY: [], geo.HARD: [], geo.JUNK: []}
        if H is None:
            labels[expected].append(k)
        else:
            H = geo.scale(fb) @ H @ geo.scale(1 / fa)  # the same map between the resized images
            labels[geo.label(geo.box_visibility(box, np.eye(3), H, sb, sa), rule)].append(k)
        gnd.append({"bbx": [float(v) for v in box], **labels})
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_arguments(difficulty: str, seed: int, size: int, n_gallery: int, n_queries: int, n_train: int,
                    train_fraction: float, val_fraction: float = 0.0) -> None:
    """Refuse, with one EngineError per problem, values build_views cannot honour (its parameters, same names)."""
    if difficulty not in DIFFICULTIES:
        raise EngineError(f"unknown difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTIES)}")
    if not _is_int(seed) or seed < 0:
        raise EngineError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(size) or not MIN_SIDE <= size <= MAX_SIZE:
        raise EngineError(f"size (the views' longer side) must be an integer from {MIN_SIDE} to {MAX_SIZE} pixels, got {size!r}")
    for name, value, least in (("n_gallery", n_gallery, 1), ("n_queries", n_queries, 1), ("n_train", n_train, 2)):
        if not _is_int(value) or value < least:
            why = " (a training pair needs two views of a scene)" if name == "n_train" else ""
            raise EngineError(f"{name} (views per scene) must be an integer of at least {least}{why}, got {value!r}")
    if not isinstance(train_fraction, numbers.Real) or not 0 < train_fraction < 1:  # NaN fails both comparisons
        raise EngineError(f"train_fraction (the share of photographs that become training scenes) must be "
                          f"between 0 and 1, exclusive, got {train_fraction!r}")
    if not isinstance(val_fraction, numbers.Real) or not 0 <= val_fraction < 1:
        raise EngineError(f"val_fraction (the share of training photographs held out as validation scenes) must be "
                          f"in [0, 1), got {val_fraction!r}")


def build_views(
    out_dir: str | Path,
    photos: list[Path] | None = None,
    difficulty: str = DEFAULT_DIFFICULTY,
    seed: int = 0,
    size: int = 512,
    n_gallery: int = 16,
    n_queries: int = 3,
    n_train: int = 24,
    train_fraction: float = 0.4,
    val_fraction: float = 0.2,
    rule: geo.LabelRule = geo.DEFAULT_RULE,
    opencv_doc: Path | None = OPENCV_DOC_DATA,
    train_photos: list[Path] | None = None,
) -> dict:
    """Build the views benchmark under `out_dir` (layout in the module docstring); returns the info dict.

    photos: scene photographs (default: `default_photos(opencv_doc)`); difficulty: a key of DIFFICULTIES;
    size: longer side of every image in pixels; per test scene n_gallery gallery views and n_queries
    queries (the same for val over the training scenes); n_train views per training scene for
    train/db.pkl (at least 2); train_fraction: the share of photographs that become training scenes, in
    (0, 1); val_fraction: the share of the training side held out as validation scenes, in [0, 1)
    (`split_scenes`); seed: a non-negative integer; opencv_doc: opencv-doc's data folder (None: neither its
    photos nor the pairs). train_photos: when given, every photo of `photos` is a test scene and these are the
    training side (train_fraction is unused; val_fraction still holds some out; the pairs benchmark is left out
    when its first views train). Out-of-range values are refused (`check_arguments`) before anything is written.
    The info dict (also out/info.json) holds seed, difficulty, size, photos with their split, counts.
    """
    check_arguments(difficulty, seed, size, n_gallery, n_queries, n_train, train_fraction, val_fraction)
    photos = [Path(p) for p in (default_photos(opencv_doc) if photos is None else photos)]
    n_test = len(photos) if train_photos is not None else 0
    photos += [Path(p) for p in train_photos or ()]
    if train_photos is None and len(photos) < MIN_PHOTOS:
        raise EngineError(f"{len(photos)} photographs given, a benchmark needs at least {MIN_PHOTOS}")
    if train_photos is not None and min(n_test, len(photos) - n_test) < MIN_PHOTOS // 2:
        raise EngineError(f"{n_test} test and {len(photos) - n_test} training photographs given, "
                          f"a benchmark needs at least {MIN_PHOTOS // 2} of each")
    d = DIFFICULTIES[difficulty]
    sources = [load_photo(path, size) for path in photos]  # every photograph decoded before anything is written
    out = Path(out_dir)
    jpg_dir = out / "jpg"
    jpg_dir.mkdir(parents=True, exist_ok=True)
    data_dir = opencv_doc if opencv_doc is not None and opencv_doc.is_dir() else None
    pinned = {first for _, first, _, _, _ in real_pairs(data_dir)} if data_dir else set()
    if train_photos is None:
        split = split_scenes(photos, seed, train_fraction, pinned, val_fraction)
    else:
        side = [n_test + k for k in np.random.default_rng([seed, 0]).permutation(len(photos) - n_test)]
        val = validation_scenes(side, val_fraction)
        split = ["test"] * n_test + ["val" if i in val else "train" for i in range(n_test, len(photos))]
        if pinned & set(photos[n_test:]):  # the pairs' first views are training scenes: the pairs are no longer unseen
            data_dir = None
    val_scenes = "val" in split  # else the old protocol: fresh views of the training scenes

    test, val, train, train_val = [], [], [], []
    for s, (path, source) in enumerate(zip(photos, sources)):
        src = (source.shape[1], source.shape[0])
        prefix = f"{s:02d}_{_stem(path)}"
        if split[s] == "test":
            test.append(_gnd_set(_rng(seed, "test", s), source, f"test_{prefix}", n_gallery, n_queries, d, size, rule, jpg_dir))
            continue
        if split[s] == "val" or not val_scenes:
            gallery, queries = _gnd_set(_rng(seed, "val", s), source, f"val_{prefix}", n_gallery, n_queries, d, size, rule, jpg_dir)
            val.append((gallery, queries))
            val_views = gallery + [q for q, _ in queries]
            train_val.append(([v.name for v in val_views], matching_pairs(val_views, src, rule)))
        if split[s] == "val":
            continue
        g = _rng(seed, "train", s)
        views = scene_views(g, source, f"train_{prefix}", n_train, d, size, "v", occlude=True)
        for v in views:
            render(g, source, v, d, jpg_dir)
        train.append(([v.name for v in views], matching_pairs(views, src, rule)))

    test_gnd, val_gnd = _gnd(test), _gnd(val)
    db = {"train": _db(train), "val": _db(train_val)}
    write_pickle(test_gnd, out / "test" / "gnd.pkl")
    write_pickle(val_gnd, out / "val" / "gnd.pkl")
    write_pickle(db, out / "train" / "db.pkl")
    pairs = _pairs_gnd(size, rule, jpg_dir, data_dir) if data_dir else None
    if pairs is not None:
        write_pickle(pairs, out / "pairs" / "gnd.pkl")

    info = {
        "seed": seed,
        "difficulty": difficulty,
        "difficulty_ranges": asdict(d),
        "label_rule": asdict(rule),
        "size": size,
        "val_split": "scenes" if val_scenes else "views",
        "photos": [{"path": str(p), "scene": s, "split": split[s]} for s, p in enumerate(photos)],
        "counts": {
            "scenes": {"train": split.count("train"), "val": split.count("val"), "test": split.count("test")},
            "test": {"gallery": len(test_gnd["imlist"]), "queries": len(test_gnd["qimlist"])},
            "val": {"gallery": len(val_gnd["imlist"]), "queries": len(val_gnd["qimlist"])},
            "train": {"images": len(db["train"]["cids"]), "pairs": len(db["train"]["qidxs"])},
            "pairs": None if pairs is None else {"gallery": len(pairs["imlist"]), "queries": len(pairs["qimlist"])},
        },
    }
    write_text(out / "info.json", json.dumps(info, indent=2) + "\n")
    return info
