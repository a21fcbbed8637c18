"""SfM-120k-format training sets: the db pickle, its validation, and where its images are.

db pickle: {'train'|'val': {'cids': [N names], 'cluster': [N ints], 'qidxs': [P ints], 'pidxs': [P ints]}}:
image i is cids[i] in cluster[i]; (qidxs[k], pidxs[k]) is a matching (query, positive) pair in one cluster.
whitening pickle: {'cids', 'qidxs', 'pidxs'} (pairs for learning Lw; no clusters).
Image layouts: 'sfm' (real SfM-120k) `ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>`;
'flat' (the views benchmark, converted user data) `jpg/<cid>.jpg`, or `jpg/<cid>` when cid has an extension.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..pickles import read_pickle
from .revisited import describe_value, image_path, names_list

LAYOUTS = ("sfm", "flat")
_LAYOUT_DIRS = {"sfm": "ims", "flat": "jpg"}
_MISSING_SHOWN = 3


class DatasetWarning(UserWarning):
    """A training set that loads but has a part that cannot be used as intended."""


@dataclass(frozen=True)
class TrainingSet:
    """One split of a training set.

    images: N image paths; cids: their N image ids (the row names of a teacher store over them).
    cluster: (N,) int64 cluster (instance) ids.
    qidxs, pidxs: (P,) int64 indices into images; pair k is (qidxs[k], pidxs[k]), same cluster, distinct images.
    """

    images: list[Path]
    cids: list[str]
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray


@dataclass(frozen=True)
class WhiteningSet:
    """Matching pairs for learning whitening: N image paths and (P,) int64 query / positive indices."""

    images: list[Path]
    qidxs: np.ndarray
    pidxs: np.ndarray


def sfm_image_path(ims_dir: Path, cid: str) -> Path:
    """Real SfM-120k: `ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>` (cirtorch's cid2filename)."""
    return ims_dir / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def image_paths(images_root: Path, cids: list[str], layout: str) -> list[Path]:
    """Paths of `cids` under `images_root` (the `ims/` or `jpg/` folder) in `layout` ('sfm' or 'flat')."""
    if layout == "sfm":
        return [sfm_image_path(images_root, c) for c in cids]
    if layout == "flat":
        return [image_path(images_root, c) for c in cids]
    raise EngineError(f"unknown image layout {layout!r} (known: {', '.join(LAYOUTS)}, auto)")


def load_training_set(db_path: str | Path, split: str = "train", images_root: str | Path | None = None,
                      layout: str = "auto", check_images: bool = True) -> TrainingSet:
    """Read and validate one split of an SfM-120k-format db pickle.

    images_root: the folder holding the images (`ims/` for 'sfm', `jpg/` for 'flat'); None looks for `ims/`
    then `jpg/` beside the pickle or one level up. layout: 'sfm', 'flat' or 'auto' (probe the first image).
    check_images: every image must exist (an EngineError names the first missing ones).
    Raises EngineError on a malformed split (lengths, index ranges, pairs across clusters, a query alone in its
    cluster); warns (DatasetWarning) about other single-image clusters, which can only serve as negatives.
    """
    db_path = Path(db_path)
    return _training_split(read_pickle(db_path), split, db_path, images_root, layout, check_images)


def _training_split(db, split: str, db_path: Path, images_root, layout: str, check_images: bool) -> TrainingSet:
    """One split of a db pickle's content, validated (see load_training_set)."""
    if not isinstance(db, dict) or split not in db:
        raise EngineError(f"no split {split!r} (a db pickle is {{'train'|'val': {{...}}}}, this one has "
                          f"{_keys(db)})", db_path)
    part = _require_keys(db[split], ("cids", "cluster", "qidxs", "pidxs"), db_path, f"db[{split!r}]")
    cids = names_list(part["cids"], db_path, f"{split}.cids")
    n = len(cids)
    cluster = _ints(part["cluster"], db_path, f"{split}.cluster")
    if len(cluster) != n:
        raise EngineError(f"{split}: 'cluster' has {len(cluster)} entries for {n} cids", db_path)
    qidxs, pidxs = _pairs(part, n, db_path, split)
    _check_clusters(cluster, qidxs, pidxs, db_path, split)
    images = _locate(db_path, cids, images_root, layout, check_images)
    return TrainingSet(images, cids, cluster, qidxs, pidxs)


def load_whitening_set(path: str | Path, images_root: str | Path | None = None, layout: str = "auto",
                       check_images: bool = True) -> WhiteningSet:
    """Read and validate a whitening pickle {'cids', 'qidxs', 'pidxs'}, or an SfM-format db pickle (its training
    split's pairs); images found as in load_training_set."""
    path = Path(path)
    data = read_pickle(path)
    if isinstance(data, dict) and "cids" not in data and "train" in data:  # a db pickle: its training pairs
        ts = _training_split(data, "train", path, images_root, layout, check_images)
        return WhiteningSet(ts.images, ts.qidxs, ts.pidxs)
    part = _require_keys(data, ("cids", "qidxs", "pidxs"), path, "whitening pickle")
    cids = names_list(part["cids"], path, "cids")
    qidxs, pidxs = _pairs(part, len(cids), path, "whitening")
    return WhiteningSet(_locate(path, cids, images_root, layout, check_images), qidxs, pidxs)


def _keys(part) -> str:
    """A dict's keys (any types, in a stable order) or, for anything else, what it is: for error messages."""
    return str(sorted(map(repr, part))) if isinstance(part, dict) else describe_value(part)


def _require_keys(part, keys: tuple[str, ...], path: Path, what: str) -> dict:
    if not isinstance(part, dict) or not set(keys) <= set(part):
        raise EngineError(f"{what} must be a dict with {', '.join(map(repr, keys))} (has {_keys(part)})", path)
    return part


def _ints(values, path: Path, what: str) -> np.ndarray:
    """A list, tuple or 1-d integer array of integers (not bools, not floats) as (N,) int64."""
    if isinstance(values, np.ndarray):
        ok = values.ndim == 1 and (values.size == 0 or values.dtype.kind in "iu")
        if ok and values.dtype.kind == "u" and values.size and values.max() > np.iinfo(np.int64).max:
            ok = False
        if not ok:
            raise EngineError(f"'{what}' must be a flat list of integers, got a {values.dtype} array of shape {values.shape}", path)
        return values.astype(np.int64)
    if not isinstance(values, (list, tuple)):
        raise EngineError(f"'{what}' must be a flat list of integers, not {describe_value(values)}", path)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not -2**63 <= v < 2**63:
            raise EngineError(f"'{what}'[{i}] must be an integer, not {describe_value(v)}", path)
    return np.array(values, dtype=np.int64).reshape(len(values))


def _pairs(part: dict, n: int, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    qidxs = _ints(part["qidxs"], path, f"{split}.qidxs")
    pidxs = _ints(part["pidxs"], path, f"{split}.pidxs")
    if len(qidxs) != len(pidxs):
        raise EngineError(f"{split}: {len(qidxs)} qidxs but {len(pidxs)} pidxs", path)
    for name, idx in (("qidxs", qidxs), ("pidxs", pidxs)):
        bad = np.flatnonzero((idx < 0) | (idx >= n))
        if bad.size:
            raise EngineError(f"{split}.{name}[{bad[0]}] = {idx[bad[0]]} is outside the {n} images", path)
    same = np.flatnonzero(qidxs == pidxs)
    if same.size:
        raise EngineError(f"{split}: pair {same[0]} uses image {qidxs[same[0]]} as its own positive", path)
    return qidxs, pidxs


def _check_clusters(cluster: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray, path: Path, split: str) -> None:
    ids, inverse, counts = np.unique(cluster, return_inverse=True, return_counts=True)
    alone = counts[inverse] == 1
    lonely_q = np.flatnonzero(alone[qidxs])
    if lonely_q.size:
        k = lonely_q[0]
        raise EngineError(f"{split}: query {qidxs[k]} (pair {k}) is the only image of cluster {cluster[qidxs[k]]}, "
                          f"so it has no true positive", path)
    cross = np.flatnonzero(cluster[qidxs] != cluster[pidxs])
    if cross.size:
        k = cross[0]
        raise EngineError(f"{split}: pair {k} joins clusters {cluster[qidxs[k]]} and {cluster[pidxs[k]]}: "
                          f"a positive must share the query's cluster", path)
    singles = ids[counts == 1]
    if singles.size:
        warnings.warn(f"{path}: {split} has {singles.size} single-image clusters (e.g. {singles[0]}): "
                      f"they serve only as negatives", DatasetWarning, stacklevel=3)


def _locate(db_path: Path, cids: list[str], images_root, layout: str, check: bool) -> list[Path]:
    if layout not in (*LAYOUTS, "auto"):
        raise EngineError(f"unknown image layout {layout!r} (known: {', '.join(LAYOUTS)}, auto)", db_path)
    root = Path(images_root) if images_root is not None else _find_root(db_path, layout)
    if not root.is_dir():
        raise EngineError("images folder not found", root)
    if layout == "auto":
        layout = _probe_layout(root, cids)
    images = image_paths(root, cids, layout)
    if check:
        missing = [p for p in images if not p.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:_MISSING_SHOWN])
            raise EngineError(f"{len(missing)} of {len(images)} images are missing in the {layout!r} layout, e.g. {shown}", root)
    return images


def _find_root(db_path: Path, layout: str) -> Path:
    """`ims/` or `jpg/` beside the pickle or one level up (sfm120k/dbs/*.pkl, views' train/db.pkl)."""
    names = [_LAYOUT_DIRS[layout]] if layout in _LAYOUT_DIRS else list(_LAYOUT_DIRS.values())
    for base in (db_path.parent, db_path.parent.parent):
        for name in names:
            if (base / name).is_dir():
                return base / name
    raise EngineError(f"no {' or '.join(n + '/' for n in names)} folder beside or above the pickle: pass the images folder", db_path)


def _probe_layout(root: Path, cids: list[str]) -> str:
    """The layout in which the first image exists; with no images, the one the folder's name suggests."""
    if not cids:
        return "sfm" if root.name == "ims" else "flat"
    for layout in LAYOUTS:
        if image_paths(root, cids[:1], layout)[0].is_file():
            return layout
    tried = ", ".join(str(image_paths(root, cids[:1], lay)[0]) for lay in LAYOUTS)
    raise EngineError(f"image {cids[0]!r} is in neither layout (tried {tried})", root)
