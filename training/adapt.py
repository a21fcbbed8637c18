"""Label-free gallery adaptation: fit a student to a gallery's own images and their stored teacher vectors.

A knowledge-transfer loss (regression above all) needs no labels, only images and their teacher vectors, and a
deployed gallery store holds exactly that. Fitting on the gallery that will be searched is transductive: its
results are reported as rows of their own (`student_adapted_*`), never as paper-protocol numbers, and the
checkpoint's training configuration names the gallery (`TrainConfig.gallery`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.store import Store, open_store

from .data import TrainData
from .trainer import TrainConfig, Trainer


def gallery_image_paths(store: Store, images_root: str | Path) -> list[Path | None]:
    """The image file of each of the store's rows: its name under `images_root` as encoded (`engine encode
    --images ROOT`), or NAME.jpg there (the revisited layout, `engine encode --gnd`).

    Names are data from disk: one that leads outside the root, or names no file, is an EngineError.
    """
    root = Path(images_root).resolve()
    if not root.is_dir():
        raise EngineError("the gallery's images folder is not a folder (give --images)", images_root)
    deleted = set(store.deleted_rows().tolist())  # removed rows need no image (None)
    paths, missing = [], []
    for i, name in enumerate(store.names()):
        if i in deleted:
            paths.append(None)
            continue
        found = None
        for candidate in (root / name, root / f"{name}.jpg"):
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):
                raise EngineError(f"row name {name!r} leads outside the images folder {root}", store.path)
            if resolved.is_file():
                found = resolved
                break
        if found is None:
            missing.append(name)
        paths.append(found)
    if missing:
        raise EngineError(f"{len(missing)} of the {len(paths)} gallery rows have no image under {root} "
                          f"(e.g. {missing[0]!r}): give the folder the store was encoded from (--images)", store.path)
    return paths


def gallery_train_data(store: Store, paths: Sequence[Path]) -> TrainData:
    """The gallery as unlabelled training data: row i's image `paths[i]` and its teacher vector; removed rows
    are left out. Every image is its own cluster and there are no pairs: only knowledge-transfer losses apply."""
    names = store.names()
    if len(paths) != len(names):
        raise EngineError(f"{len(paths)} image paths for a store of {len(names)} rows", store.path)
    keep = np.setdiff1d(np.arange(len(names)), store.deleted_rows())
    if len(keep) < 2:
        raise EngineError(f"the gallery has {len(keep)} rows: adaptation needs at least 2 images", store.path)
    empty = np.zeros(0, np.int64)
    return TrainData([Path(paths[i]) for i in keep], [names[i] for i in keep], keep.astype(np.int64), empty, empty,
                     store.vectors()[keep], store.space)


def adapt_to_gallery(cfg: TrainConfig, gallery: str | Path, out_dir: str | Path, paths: Sequence[Path] | None = None,
                     images_root: str | Path | None = None, init: str | Path | None = None,
                     progress: bool | None = None) -> dict:
    """Fit a student (the checkpoint `init`, else an untrained `cfg.student`) to gallery store `gallery`: its
    rows' images (`paths`, or found under `images_root` by `gallery_image_paths`) regressed onto their stored
    teacher vectors by `cfg.loss`. Resumes in `out_dir` like any run; returns the last epoch's metrics.

    There is no validation: the gallery is the data, so no image of it is held out. A tuple loss (it needs
    labels) is an EngineError.
    """
    store = open_store(gallery)
    cfg = replace(cfg, gallery=str(store.path))
    cfg.check()
    if cfg.build_loss().needs_tuples:
        raise EngineError(f"{cfg.loss} needs labelled tuples, a gallery has none: adapt with a knowledge-transfer "
                          f"loss (regression, rkd, darkrank, csd)")
    if paths is None:
        if images_root is None:
            raise EngineError("give the folder the gallery was encoded from (--images)", store.path)
        paths = gallery_image_paths(store, images_root)
    return Trainer(cfg, gallery_train_data(store, paths), out_dir, None, progress=progress, init=init).fit()
