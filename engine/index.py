"""A resident index: one or more stores opened once, searched many times, from many threads at once.

`Index(paths)` opens the stores (same space and D) and keeps their shards mapped; `search` answers exactly as
`engine.search_stores` does over them; `refresh()` moves to a newer published generation of the stores, whole:
a search running meanwhile sees the old gallery or the new one, never a mix.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import EngineError
from .search import search_stores
from .store import Store, open_store


class Index:
    """Stores taken as one gallery (rows concatenated in the order given: global ids as `search_stores`)."""

    def __init__(self, stores: Sequence[str | Path | Store], in_memory: bool = False):
        if not stores:
            raise EngineError("an index needs at least one store")
        self.paths = [Path(s.path if isinstance(s, Store) else s) for s in stores]
        self.in_memory = in_memory
        self._lock = threading.Lock()
        self._stores = self._open()

    def _open(self) -> list[Store]:
        return [open_store(p) for p in self.paths]

    @property
    def stores(self) -> list[Store]:
        return self._stores

    @property
    def count(self) -> int:
        return sum(s.count for s in self._stores)

    @property
    def dim(self) -> int:
        return self._stores[0].dim

    @property
    def space(self) -> str:
        return self._stores[0].space

    @property
    def generation(self) -> tuple[int, ...]:
        return tuple(s.generation for s in self._stores)

    def search(self, queries: np.ndarray, k: int, space: str | None = None, **options) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 Q x k', ids int64 Q x k'), exactly `engine.search_stores(self.stores, ...)`'s."""
        stores = self._stores  # one generation for the whole call
        return search_stores(stores, queries, k, space, **options)

    def names(self, ids: np.ndarray) -> list[list[str]]:
        """The image name of each global id (Q x k' -> lists)."""
        names = [n for s in self._stores for n in s.names()]
        return [[names[i] for i in row] for row in np.asarray(ids).tolist()]

    def refresh(self) -> bool:
        """Reopen the stores if any published a new generation; True if the gallery changed."""
        with self._lock:
            fresh = self._open()
            if tuple(s.generation for s in fresh) == self.generation:
                return False
            self._stores = fresh
            return True
