"""Real photographs for the offline views benchmark: where they are, and how to read them.

Sources, in this order: photographs shipped inside pip packages (scikit-image, scikit-learn,
matplotlib; found through the installed package, never a fixed site-packages path), then
Debian's `opencv-doc` examples when that package is installed. Drawings, renders, charts,
text pages, textures and calibration targets are left out, and so is the second view of
each real two-view pair (it is kept for `real_pairs`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from ..errors import EngineError
from ..images import open_rgb

OPENCV_DOC_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MIN_PHOTOS = 4  # two test scenes (so queries have negatives) and two training scenes (so mining has clusters)

# (package, folder inside it, file names): the photographs among each package's sample data.
PIP_PHOTOS = (
    (
        "skimage",
        "data",
        (
            "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "hubble_deep_field.jpg",
            "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg",
        ),
    ),
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
    ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)),
)

# opencv-doc photographs of single scenes (the first views of the pairs below are added to them).
OPENCV_DOC_PHOTOS = (
    "apple.jpg", "baboon.jpg", "blox.jpg", "board.jpg", "building.jpg", "butterfly.jpg", "chicky_512.png",
    "fruits.jpg", "home.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "smarties.png",
    "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg", "sudoku.png",
)

# opencv-doc two-view pairs of one scene: (name, first view, second view, ground-truth homography file,
# expected label of the second view when no homography is known).
OPENCV_DOC_PAIRS = (
    ("graf", "graf1.png", "graf3.png", "H1to3p.xml", None),  # viewpoint change of about 40 degrees
    ("leuven", "leuvenA.jpg", "leuvenB.jpg", None, "easy"),  # exposure change
    ("aero", "aero1.jpg", "aero3.jpg", None, "easy"),  # aerial views, slight shift
    ("box", "box.png", "box_in_scene.png", None, "hard"),  # the object small and rotated in clutter
    ("aloe", "aloeL.jpg", "aloeR.jpg", None, "easy"),  # stereo
    ("stereo", "left.jpg", "right.jpg", None, "easy"),  # stereo
    ("basketball", "basketball1.png", "basketball2.png", None, "easy"),  # consecutive video frames
    ("rubberwhale", "rubberwhale1.png", "rubberwhale2.png", None, "easy"),  # optical-flow frames
    ("ela", "ela_original.jpg", "ela_modified.jpg", None, "easy"),  # the same photo with a pasted-in object
)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pip_photos() -> list[Path]:
    """Photographs shipped in the installed pip packages, in a fixed order (missing packages or files skipped)."""
    found = []
    for package, folder, names in PIP_PHOTOS:
        root = _package_dir(package)
        if root is not None:
            found += [root / folder / n for n in names if (root / folder / n).is_file()]
    return found


def opencv_doc_photos(data_dir: Path = OPENCV_DOC_DATA) -> list[Path]:
    """opencv-doc photographs (singles, then the first view of each pair); [] when opencv-doc is absent."""
    names = list(OPENCV_DOC_PHOTOS) + [first for _, first, _, _, _ in OPENCV_DOC_PAIRS]
    return [data_dir / n for n in names if (data_dir / n).is_file()]


def default_photos(opencv_doc: Path | None = OPENCV_DOC_DATA) -> list[Path]:
    """The default scene photographs: pip photos, then opencv-doc's when `opencv_doc` (its data folder) exists.

    Pass opencv_doc=None for the pip-only set. Raises EngineError if fewer than MIN_PHOTOS are found.
    """
    photos = pip_photos() + (opencv_doc_photos(opencv_doc) if opencv_doc is not None else [])
    if len(photos) < MIN_PHOTOS:
        raise EngineError(
            f"only {len(photos)} packaged photographs found, a benchmark needs {MIN_PHOTOS}: "
            "install scikit-image, scikit-learn and matplotlib, or pass --photos DIR"
        )
    return photos


def photos_in(directory: str | Path, minimum: int = MIN_PHOTOS) -> list[Path]:
    """Image files (by suffix, case-insensitive; not recursive) directly in `directory`, sorted by name.

    Raises EngineError naming the folder when it is missing or holds fewer than `minimum` images.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError("photos folder not found", directory)
    photos = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if len(photos) < minimum:
        raise EngineError(
            f"holds {len(photos)} photographs ({', '.join(PHOTO_SUFFIXES)}), a benchmark needs at least {minimum}",
            directory,
        )
    return photos


def thumbnail(path: str | Path) -> np.ndarray:
    """A 16x16 grey thumbnail of a photograph, zero-mean and unit-norm (float64, 256 values): two copies of one
    photograph, at any size or JPEG quality, have a dot product near 1; different photographs rarely above 0.9."""
    grey = load_photo(path, 256).astype(np.float32).mean(axis=2)
    t = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-12)


SAME_PHOTO = 0.98  # thumbnail dot product above which two files are taken for one photograph


def unseen(candidates: list[Path], photos: list[Path]) -> list[Path]:
    """The candidates that are none of `photos` (by thumbnail, so a re-encoded or resized copy counts as seen)."""
    seen = np.stack([thumbnail(p) for p in photos])
    return [c for c in candidates if float((seen @ thumbnail(c)).max()) <= SAME_PHOTO]


def real_pairs(data_dir: Path = OPENCV_DOC_DATA) -> list[tuple[str, Path, Path, np.ndarray | None, str | None]]:
    """opencv-doc's real two-view pairs present on this machine ([] without opencv-doc).

    Each is (name, first view, second view, H, label): H is the float64 3x3 homography from the first
    view's pixels to the second's where the dataset gives one (graf), else None; label is the expected
    revisited-Oxford label of the second view when there is no H, else None.
    """
    pairs = []
    for name, first, second, h_file, expected in OPENCV_DOC_PAIRS:
        a, b = data_dir / first, data_dir / second
        if a.is_file() and b.is_file():
            H = read_homography(data_dir / h_file) if h_file else None
            pairs.append((name, a, b, H, expected))
    return pairs


def read_homography(path: Path) -> np.ndarray:
    """The first matrix of an OpenCV FileStorage file (e.g. graf's H1to3p.xml) as float64 3x3."""
    fs = cv2.FileStorage(str(path), cv2.FILE_STORAGE_READ)
    try:
        H = fs.getFirstTopLevelNode().mat() if fs.isOpened() else None
    finally:
        fs.release()
    if H is None or H.shape != (3, 3):
        raise EngineError("not an OpenCV file holding a 3x3 homography", path)
    return H.astype(np.float64)


def load_photo(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Read a photograph as an (H, W, 3) uint8 RGB array through the engine's one decoder (`images.open_rgb`:
    EXIF-rotated, transparency on white, size-checked before decoding).

    With max_side, the image is resized (area filter down, cubic up) so its longer side is max_side.
    Raises EngineError naming the file when it cannot be read as an image.
    """
    rgb = np.asarray(open_rgb(path))
    return rgb if max_side is None else fit(rgb, max_side)


def fit(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Resize an (H, W, C) image so its longer side is max_side (area filter down, cubic up)."""
    h, w = rgb.shape[:2]
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
