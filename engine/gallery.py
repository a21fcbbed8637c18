"""Growing and shrinking a store by generations: rows added, rows removed (tombstones), the store compacted.

Every change runs under the store's write lock (one writer at a time) as one `Change`: it reads the published
manifest, writes only new files (tagged with the generation they belong to, so no name is ever reused), then
publishes the next manifest (generation + 1) atomically, last, and only then unlinks the files the new manifest
no longer names (compact's old shards, a superseded tombstone list).

Readers: a `Store` maps every file of its generation when `open_store` opens it, and keeps the mappings, so an
open store (an `engine.Index`) reads its generation whole after a change unlinks those files (POSIX keeps
unlinked, mapped data alive) and moves to the new one with `refresh()`. A reader that has read the manifest but
not yet mapped its files when they are unlinked sees a file missing: `open_store` then starts over at the new
generation. A change that is interrupted leaves the store at its last published generation; its unpublished
files are removed by the next writer, and rerunning it does the whole change again, to the same result.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import EngineError
from .files import save_npy
from .lock import WriteLock
from .store import (Store, check_finite, open_store, read_manifest, referenced_files, remove_orphans, save_copy, save_names,
                    write_manifest, write_shard_files)


class Change:
    """One change of a store: the write lock, the current generation (`current`), the next manifest (`manifest`).

    Use as a context manager (the lock is released at its end); `publish()` makes the change visible.
    The store must be complete (an encode still running or interrupted is refused).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        read_manifest(self.path)  # a missing or foreign folder is refused before a lock file is made in it
        self.lock = WriteLock(self.path)
        try:
            self.current = open_store(self.path)  # what the last writer published, read under the lock
            remove_orphans(self.path, self.current.manifest)
        except BaseException:
            self.lock.release()
            raise
        self.manifest = copy.deepcopy(self.current.manifest)
        self.generation = self.current.generation + 1  # the generation this change publishes

    def __enter__(self) -> Change:
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def live_names(self) -> dict[str, list[int]]:
        """The current generation's rows by name, removed rows left out: {name: [row, ...]}."""
        deleted = set(self.current.deleted_rows().tolist())
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.current.names()):
            if row not in deleted:
                rows.setdefault(name, []).append(row)
        return rows

    @property
    def items_done(self) -> int:
        """Input items the shards cover so far: the first new item's number."""
        shards = self.manifest["shards"]
        return shards[-1]["items"][1] if shards else 0

    def append_shard(self, vectors: np.ndarray, names: Sequence[str], n_items: int, skipped: Sequence[dict] = ()) -> None:
        """Add one shard (rows x dim float32, finite, one name per row) covering `n_items` new input items (those
        not encoded are in `skipped`), in every copy of the store; written now, published by `publish`."""
        m = self.manifest
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != m["dim"] or len(names) != len(vectors):
            raise EngineError(f"{len(names)} names for vectors of shape {vectors.shape}: the store needs N x {m['dim']}", self.path)
        check_finite(vectors, names, m["count"], self.path)
        index, first = len(m["shards"]), self.items_done
        record, entries = write_shard_files(self.path, list(m["copies"]), f"shard-{index:05d}-g{self.generation:05d}", vectors, names)
        m["shards"].append({"start": m["count"], "rows": len(vectors), "items": [first, first + n_items], **record,
                            "skipped": list(skipped), "sources": None})
        for dtype, entry in entries.items():
            m["copies"][dtype].append(entry)
        m["count"] += len(vectors)
        m["n_items"] = first + n_items

    def publish(self) -> Store:
        """Publish the next manifest (generation + 1), then unlink the files only the previous one named; returns
        the new generation, opened."""
        self.manifest["generation"] = self.generation
        self.manifest["source_key"] = None  # no longer the output of one encode job: rerunning that job is refused
        write_manifest(self.path, self.manifest)
        for rel in referenced_files(self.current.manifest) - referenced_files(self.manifest):
            (self.path / rel).unlink(missing_ok=True)
        return open_store(self.path)


def add_vectors(path: str | Path, vectors: np.ndarray, names: Sequence[str]) -> Store:
    """Append rows (N x D real, finite; one new name each) to a complete store as new shards of its shard size,
    in every copy; published as one new generation. A name the store already holds (not removed) is refused."""
    vectors = np.asarray(vectors, dtype=np.float32)
    names = list(names)
    with Change(path) as change:
        check_new_names(change, names)
        rows = change.manifest["shard_rows"]
        for a in range(0, len(names), rows):
            change.append_shard(vectors[a:a + rows], names[a:a + rows], len(names[a:a + rows]))
        return change.publish()


def check_new_names(change: Change, names: Sequence[str]) -> None:
    """Refuse an addition that would give two live rows one name (names are how `remove` finds rows)."""
    if not names:
        raise EngineError("nothing to add: the list of images is empty", change.path)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise EngineError(f"{name!r} is given twice: every row needs its own name", change.path)
        seen.add(name)
    taken = seen & change.live_names().keys()
    if taken:
        first = sorted(taken)
        raise EngineError(f"already holds {len(first)} of these names ({', '.join(map(repr, first[:3]))}"
                          f"{', ...' if len(first) > 3 else ''}): remove them first to replace them", change.path)


def remove_names(path: str | Path, names: Sequence[str], missing_ok: bool = False) -> tuple[Store, int]:
    """Mark every live row holding one of `names` deleted (a tombstone list, published as a new generation);
    the other rows keep their numbers. A name the store does not hold (or holds only removed) is an EngineError
    naming it unless `missing_ok`. Returns (the new generation opened, rows newly removed); nothing removed:
    the store as it was, no new generation."""
    with Change(path) as change:
        live = change.live_names()
        missing = [n for n in dict.fromkeys(names) if n not in live]
        if missing and not missing_ok:
            raise EngineError(f"holds no row named {missing[0]!r}" + (f" (nor {len(missing) - 1} other name(s))" if len(missing) > 1 else "")
                              + ": pass --missing-ok to skip unknown names", change.path)
        rows = np.array(sorted({r for n in names for r in live.get(n, ())}), np.int64)
        if len(rows) == 0:
            return change.current, 0
        deleted = np.union1d(change.current.deleted_rows(), rows).astype(np.int64)
        rel = f"deleted/gen-{change.generation:05d}.npy"
        change.manifest["deleted"] = {"file": rel, "sha256": save_npy(change.path / rel, deleted), "rows": len(deleted)}
        return change.publish(), len(rows)


def compact(path: str | Path) -> tuple[Store, Path | None]:
    """Rewrite the store without its removed rows, every copy as stored (bit for bit), packed into shards of
    the store's shard size, as a new generation with no tombstones.

    Writes `maps/compact-gen-NNNNN.npy` (NNNNN the new generation): int64, one entry per old row, its new
    row number or -1 for a removed row. Returns (the new generation opened, the map's path); a store with
    nothing removed is returned as it is, with None.
    """
    with Change(path) as change:
        old = change.current
        deleted = old.deleted_rows()
        if len(deleted) == 0:
            return old, None
        id_map = np.full(old.count, -1, np.int64)
        keep = np.setdiff1d(np.arange(old.count, dtype=np.int64), deleted)
        id_map[keep] = np.arange(len(keep), dtype=np.int64)
        m = change.manifest
        m["shards"], m["copies"], m["deleted"] = [], {d: [] for d in m["copies"]}, None
        names = np.array(old.names(), dtype=object)
        starts = np.array([s["start"] for s in old.manifest["shards"]], np.int64)
        rows = m["shard_rows"]
        for index, a in enumerate(range(0, len(keep), rows)):
            ids = keep[a:a + rows]
            stem = f"shard-{index:05d}-g{change.generation:05d}"
            record = {"start": int(a), "rows": len(ids), "items": [int(a), int(a) + len(ids)], "skipped": [], "sources": None}
            for dtype in m["copies"]:
                stored, scale = _gather(list(old.shards(dtype)), starts, ids)
                m["copies"][dtype].append(save_copy(change.path, dtype, stem, stored, scale))
            record["names"] = f"names/{stem}.parquet"
            record["names_sha256"] = save_names(change.path / record["names"], names[ids].tolist())
            m["shards"].append(record)
        m["count"] = m["n_items"] = len(keep)
        map_path = change.path / "maps" / f"compact-gen-{change.generation:05d}.npy"
        save_npy(map_path, id_map)
        return change.publish(), map_path


def _gather(views, starts: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows `ids` (global, increasing) of one copy as stored: (vectors, int8 scales or None)."""
    shard = np.searchsorted(starts, ids, side="right") - 1
    vecs, scales = [], []
    for s in np.unique(shard):
        local = ids[shard == s] - starts[s]
        vecs.append(np.asarray(views[s].vectors[local]))
        if views[s].scale is not None:
            scales.append(np.asarray(views[s].scale[local]))
    return np.concatenate(vecs), (np.concatenate(scales) if scales else None)

