"""A resident index: one or more stores opened once, searched many times, from many threads at once.

`Index(paths)` opens the stores (same space and D) and holds every copy's shards open (memory-mapped, or read
into RAM with `in_memory=True`); `search` answers exactly as `engine.search_stores` does over them (both run
`engine.search.search_sources`), never returning a deleted row. What one generation of the stores holds is an
immutable snapshot: a search takes the snapshot once and reads only it, and `refresh()` builds the next
generation's snapshot whole before swapping it in, so a search running meanwhile sees the old gallery or the
new one, never a mix, and the old views are closed when the last search holding them returns.

`Index(paths, device="cuda")` also uploads each generation once to that device (engine.resident): searches are
then matmuls on the device, their candidates rescored in float32, with the same results; `device="cpu"` runs the
same torch code on the host (how it is tested without a GPU).
"""
from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EngineError
from .resident import ResidentGallery
from .search import Source, check_gallery, search_sources
from .store import ShardView, Store, open_store, read_manifest


def _held(view: ShardView, in_memory: bool) -> ShardView:
    if not in_memory:
        return view
    scale = None if view.scale is None else np.array(view.scale)
    return ShardView(view.index, view.start, view.rows, view.dtype, np.array(view.vectors), scale)


def _open_source(path: Path, offset: int, in_memory: bool, only: frozenset[int] | None) -> Source:
    """One store opened whole: every copy's shard views (of the `only` shards when given) held for searches."""
    store = open_store(path)  # maps every file of one generation (retrying if a writer unlinks them meanwhile)
    count = len(store.manifest["shards"])
    if only is not None and not only <= set(range(count)):
        raise EngineError(f"shards {sorted(only - set(range(count)))} are not in the store ({count} shards)", path)
    views = {
        dtype: tuple(_held(v, in_memory) for v in store.shards(dtype) if only is None or v.index in only)
        for dtype in store.dtypes
    }
    deleted = np.asarray(store.deleted_rows(), dtype=np.int64)
    held = views[store.exact_dtype]
    if only is not None:
        inside = np.zeros(len(deleted), bool)
        for v in held:
            inside |= (deleted >= v.start) & (deleted < v.start + v.rows)
        deleted = deleted[inside]
    return Source(store, offset, views.__getitem__, sum(v.rows for v in held), deleted)


@dataclass
class _Gallery:
    """One generation of the stores, as searches read it (never changed once built, but for the names cache)."""

    sources: list[Source]
    resident: ResidentGallery | None = None
    _names: np.ndarray | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def names(self) -> np.ndarray:
        """Every row's name over the concatenated stores (object array), read once per generation."""
        with self._lock:
            if self._names is None:
                self._names = np.array([n for src in self.sources for n in src.store.names()], dtype=object)
            return self._names


class Index:
    """Stores taken as one gallery (rows concatenated in the order given: global ids as `search_stores`).

    stores: paths or opened stores (reopened here); in_memory: read every copy of every shard into RAM
    instead of mapping it; shards: for a single store, the shard indices this index holds (a shard group:
    ids stay the store's row numbers; None = all shards). device: None (search the mapped shards with the host
    kernels) or a torch device ("cuda", "cuda:1", "cpu") that holds the gallery (engine.resident): device_dtype,
    the scanned copy there (float16, bfloat16 or float32; None: float16, or bfloat16 for stores holding that and
    no float16), and device_memory, the bytes it may take (None: 90% of a GPU's free memory, no limit on the
    CPU; a gallery beyond it streams through in chunks). Thread-safe: any number of threads may search at once.
    """

    def __init__(
        self,
        stores: Sequence[str | Path | Store],
        in_memory: bool = False,
        shards: Collection[int] | None = None,
        device: str | None = None,
        device_dtype: str | None = None,
        device_memory: int | None = None,
    ):
        if not stores:
            raise EngineError("an index needs at least one store")
        self.paths = [Path(s.path if isinstance(s, Store) else s) for s in stores]
        self.in_memory = in_memory
        self.shards = None if shards is None else self._check_shards(shards)
        if device is None and (device_dtype, device_memory) != (None, None):
            raise EngineError("device_dtype and device_memory are options of a device index: give device=")
        self.device, self.device_dtype, self.device_memory = device, device_dtype, device_memory
        self._lock = threading.Lock()  # one refresh at a time
        self._gallery = self._open()

    def _check_shards(self, shards: Collection[int]) -> frozenset[int]:
        if len(self.paths) != 1:
            raise EngineError("shards= selects shards of a single store: give one store")
        picked = list(shards)
        if not picked:
            raise EngineError("shards= is empty: give at least one shard index", self.paths[0])
        for i in picked:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
                raise EngineError(f"shard indices are integers >= 0, got {i!r}", self.paths[0])
        return frozenset(int(i) for i in picked)

    def _open(self) -> _Gallery:
        sources, offset = [], 0
        for path in self.paths:
            sources.append(_open_source(path, offset, self.in_memory, self.shards))
            offset += sources[-1].store.count
        check_gallery([src.store for src in sources])
        if self.device is None:
            return _Gallery(sources)
        return _Gallery(sources, ResidentGallery(sources, self.device, self.device_dtype, self.device_memory))

    @property
    def stores(self) -> list[Store]:
        return [src.store for src in self._gallery.sources]

    @property
    def count(self) -> int:
        """Rows a search may return: those of the held shards, less the deleted ones."""
        return sum(src.live for src in self._gallery.sources)

    @property
    def dim(self) -> int:
        return self._gallery.sources[0].store.dim

    @property
    def space(self) -> str:
        return self._gallery.sources[0].store.space

    @property
    def generation(self) -> tuple[int, ...]:
        """Each store's published generation, as opened."""
        return tuple(src.store.generation for src in self._gallery.sources)

    def search(self, queries: np.ndarray, k: int, space: str | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 Q x k', ids int64 Q x k'), exactly `engine.search_stores(self.stores, ...)`'s.

        Options as `engine.search` (scan, rescore, backend, threads, isa, device); a device index takes scan (its
        device_dtype) and rescore only. One generation throughout.
        """
        gallery = self._gallery
        return search_sources(gallery.sources, queries, k, space, resident=gallery.resident, **options)

    def names(self, ids: np.ndarray) -> list[list[str]]:
        """The image name of each global id (Q x k' int -> Q lists of k' names)."""
        names = self._gallery.names()
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise EngineError(f"ids must be a Q x k integer array, got {ids.dtype} {ids.shape}")
        total = sum(src.store.count for src in self._gallery.sources)
        if ids.size and (ids.min() < 0 or ids.max() >= total):
            raise EngineError(f"ids must be row numbers of the gallery, 0 to {total - 1}")
        return names[ids].tolist()

    def refresh(self) -> bool:
        """Reopen the stores if any published a new generation; True if the gallery changed.

        The new generation is opened whole before it replaces the old one; if it cannot be opened (an
        EngineError, raised here) the index keeps the gallery it had.
        """
        with self._lock:
            if tuple(Store(p, read_manifest(p)).generation for p in self.paths) == self.generation:
                return False
            self._gallery = self._open()
            return True
