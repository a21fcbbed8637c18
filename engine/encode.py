"""Encoding images into vectors: a DataLoader decodes in parallel with inference, results go to a store or an .npy.

`encode_items` is the one loop; `encode_to_store` (resumable, shard by shard) and
`encode_to_array` are its two sinks. Items are (path, bbx or None) pairs: queries
carry their box and are cropped before encoding.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from .errors import EngineError
from .images import DEFAULT_MAX_SIDE, load_image
from .models import Encoder
from .store import (
    DEFAULT_SHARD_ROWS,
    MANIFEST,
    Store,
    StoreWriter,
    atomic_save_npy,
    atomic_write_bytes,
    open_store,
    read_manifest,
)

Item = tuple[Path, Sequence[float] | None]


@dataclass
class EncodeOptions:
    """How images become vectors. scales: multi-scale factors (METHOD.md), 1.0 alone for single scale."""

    max_side: int = DEFAULT_MAX_SIDE
    batch_size: int = 8
    workers: int = 1
    scales: tuple[float, ...] = (1.0,)
    skip_bad: bool = False
    device: str = "cpu"
    progress: bool | None = None  # None: only when stderr is a terminal
    label: str = "encoding"
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"max_side": self.max_side, "scales": list(self.scales)}


class ItemDataset(Dataset):
    """Decodes item i; a failure is returned as a message (so the main process can name or skip it), not raised."""

    def __init__(self, items: Sequence[Item], max_side: int):
        self.items = items
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, bbx = self.items[i]
        try:
            return i, load_image(path, self.max_side, bbx), None
        except EngineError as e:
            return i, None, str(e)


def _collate(batch):
    return batch


@torch.no_grad()
def describe(encoder: Encoder, images: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Descriptors of a batch of same-sized images (B x 3 x H x W in [0, 1]) -> B x D float32.

    Several scales combine as L2((mean_s f_s^p)^(1/p)), p the GeM exponent (1 when a whitening follows).
    """
    if len(scales) == 1 and scales[0] == 1.0:
        return encoder(images)
    p = 1.0 if encoder.head.whiten is not None else float(encoder.head.p)
    acc = None
    for s in scales:
        x = images if s == 1.0 else torch.nn.functional.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False)
        v = encoder(x).clamp(min=0).pow(p) if p != 1.0 else encoder(x)
        acc = v if acc is None else acc + v
    acc = acc / len(scales)
    v = acc.pow(1.0 / p) if p != 1.0 else acc
    return torch.nn.functional.normalize(v, dim=-1)


def _progress(opts: EncodeOptions, total: int) -> Progress:
    enabled = sys.stderr.isatty() if opts.progress is None else opts.progress
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def encode_items(encoder: Encoder, items: Sequence[Item], opts: EncodeOptions) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield (index, vector (D,) float32 or None, error or None) for every item, in order.

    A failed item raises EngineError unless `opts.skip_bad`, in which case it is yielded with its error.
    """
    device = torch.device(opts.device)
    encoder = encoder.to(device).eval()
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    loader = DataLoader(
        ItemDataset(items, opts.max_side),
        batch_size=opts.batch_size,
        num_workers=opts.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    done = 0
    with _progress(opts, len(items)) as bar:
        task = bar.add_task(opts.label, total=len(items), rate="")
        for batch in loader:
            # Images of one size share a forward pass; others go alone.
            by_shape: dict[tuple, list] = {}
            out: dict[int, tuple] = {}
            for i, img, err in batch:
                if err is not None:
                    if not opts.skip_bad:
                        raise EngineError(err + " (pass --skip-bad to record it and go on)")
                    out[i] = (None, err)
                else:
                    by_shape.setdefault(tuple(img.shape), []).append((i, img))
            for group in by_shape.values():
                x = torch.stack([img for _, img in group]).to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                vecs = describe(encoder, x, opts.scales).float().cpu().numpy()
                for (i, _), v in zip(group, vecs):
                    out[i] = (v, None)
            for i, _, _ in batch:
                yield i, *out[i]
            done += len(batch)
            elapsed = bar.tasks[task].elapsed or 0.0
            bar.update(task, advance=len(batch), rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")


def encode_to_array(encoder: Encoder, items: Sequence[Item], opts: EncodeOptions) -> tuple[np.ndarray, list[int], list[dict]]:
    """All items in memory: (vectors N' x D float32, indices of the encoded items, skipped [{item, path, error}])."""
    vecs, kept, skipped = [], [], []
    for i, v, err in encode_items(encoder, items, opts):
        if v is None:
            skipped.append({"item": i, "path": str(items[i][0]), "error": err})
        else:
            vecs.append(v)
            kept.append(i)
    array = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, encoder.dim), np.float32)
    return array, kept, skipped


def source_key(encoder: Encoder, items: Sequence[Item], opts: EncodeOptions) -> str:
    """Identifies an encode job (encoder weights, image list, boxes, resolution): resuming needs the same key."""
    h = hashlib.sha256()
    h.update(json.dumps([encoder.space, encoder.name, opts.describe()]).encode())
    for path, bbx in items:
        h.update(f"{path}|{list(bbx) if bbx is not None else ''}\n".encode())
    return h.hexdigest()[:32]


def encode_to_store(
    encoder: Encoder,
    items: Sequence[Item],
    names: Sequence[str],
    out: str | Path,
    opts: EncodeOptions,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Store:
    """Encode items into a store shard by shard; rerunning after an interruption resumes at the first missing shard."""
    if len(items) == 0:
        raise EngineError("nothing to encode: the image list is empty")
    info = {"encoder": encoder.config, "encode": opts.describe()}
    key = source_key(encoder, items, opts)
    if not overwrite and (Path(out) / MANIFEST).exists():
        existing = read_manifest(Path(out))
        if existing.get("complete") and existing.get("source_key") == key and list(existing["copies"]) == [dtype]:
            return open_store(out)  # the same job already finished: nothing to do
    writer = StoreWriter(out, encoder.space, encoder.dim, dtype, shard_rows, len(items), key, info, overwrite)
    start = writer.items_done
    pending = list(range(start, len(items)))
    vecs, kept, skipped = [], [], []
    shard_start = start
    for pos, (_, v, err) in enumerate(encode_items(encoder, [items[i] for i in pending], opts)):
        i = pending[pos]
        if v is None:
            skipped.append({"item": i, "path": str(items[i][0]), "error": err})
        else:
            vecs.append(v)
            kept.append(i)
        if i + 1 - shard_start == shard_rows or i + 1 == len(items):
            array = np.stack(vecs) if vecs else np.zeros((0, encoder.dim), np.float32)
            writer.add_shard(array, [names[j] for j in kept], (shard_start, i + 1), skipped)
            vecs, kept, skipped = [], [], []
            shard_start = i + 1
    return writer.finish()


# ---------------------------------------------------------------- query vectors as .npy + JSON sidecar


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def save_vectors(path: str | Path, vectors: np.ndarray, meta: dict) -> Path:
    """Vectors as .npy with a JSON sidecar (`<path>.json`: space, dim, encoder, names, skipped), both written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(path, np.asarray(vectors, dtype=np.float32))
    atomic_write_bytes(sidecar_path(path), json.dumps(meta, indent=1).encode())
    return path


def load_vectors(path: str | Path) -> tuple[np.ndarray, dict]:
    """(vectors Q x D float32, metadata) from an .npy (+ optional sidecar) or a store directory."""
    path = Path(path)
    if not path.exists():
        raise EngineError("no such query file", path)
    if path.is_dir():
        store = open_store(path)
        return store.vectors(), {"space": store.space, "dim": store.dim, "names": store.names()}
    try:
        vectors = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EngineError(f"not a readable .npy array ({type(e).__name__})", path) from None
    if vectors.ndim != 2:
        raise EngineError(f"query vectors must be a Q x D array, got shape {vectors.shape}", path)
    meta = {}
    side = sidecar_path(path)
    if side.exists():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise EngineError(f"unreadable sidecar ({e})", side) from None
        if meta.get("dim") not in (None, vectors.shape[1]):
            raise EngineError(f"sidecar says D = {meta['dim']}, the array has D = {vectors.shape[1]}", side)
    return vectors.astype(np.float32, copy=False), meta


def default_workers() -> int:
    """Decoding workers: one per two cores, at least one, so inference keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)
