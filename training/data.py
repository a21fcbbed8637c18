"""What training reads: the training set's structure joined with the stored teacher vectors of its images.

The teacher never runs during training: its vectors come from a store encoded once
(`engine encode --model TEACHER --train-set DB.pkl --out STORE`), whose row names are the
training set's image ids. Images are decoded by a DataLoader in worker processes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from engine.datasets.sfm import load_training_set
from engine.errors import EngineError
from engine.images import load_image
from engine.store import Store


@dataclass
class TrainData:
    """Images of one split, their clusters, the (query, positive) pairs and each image's teacher vector."""

    paths: list[Path]
    cids: list[str]
    cluster: np.ndarray  # N int64
    qidxs: np.ndarray  # M int64
    pidxs: np.ndarray  # M int64
    teacher: np.ndarray  # N x D float32, row i = t(image i)
    space: str

    @property
    def dim(self) -> int:
        return self.teacher.shape[1]


def load_train_data(db_path: str | Path, store: Store, images_root: str | Path | None = None, split: str = "train") -> TrainData:
    """Join a training set with a teacher store over its images (matched by image id); every image must be there.

    images_root: the `ims/` or `jpg/` folder (None: found beside the db pickle or one level up).
    """
    ts = load_training_set(db_path, split, images_root)
    row_of = {n: i for i, n in enumerate(store.names())}
    missing = [c for c in ts.cids if c not in row_of]
    if missing:
        raise EngineError(
            f"{len(missing)} of the {len(ts.cids)} training images have no teacher vector (e.g. {missing[0]!r}): "
            f"the store was not encoded from this training set (engine encode --train-set {db_path})",
            store.path,
        )
    teacher = store.vectors()[[row_of[c] for c in ts.cids]]
    return TrainData(ts.images, ts.cids, ts.cluster, ts.qidxs, ts.pidxs, teacher, store.space)


class BatchDataset(Dataset):
    """Item b is batch b: the images of `batches[b]` decoded and stacked (same-size images) or as a list."""

    def __init__(self, paths: Sequence[Path], batches: Sequence[Sequence[int]], max_side: int):
        self.paths = paths
        self.batches = batches
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        return [load_image(self.paths[i], self.max_side) for i in self.batches[b]]


def batch_loader(paths: Sequence[Path], batches: Sequence[Sequence[int]], max_side: int, workers: int) -> DataLoader:
    """Decode batches of image indices in `workers` processes, in order."""
    return DataLoader(BatchDataset(paths, batches, max_side), batch_size=None, num_workers=workers, collate_fn=None)


def forward_images(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """Run a model over images of possibly different sizes (one pass per distinct size); returns rows in input order."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    for idx in by_shape.values():
        vecs = model(torch.stack([images[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = vecs[j]
    return torch.stack(out)
