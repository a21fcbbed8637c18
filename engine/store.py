"""The gallery store: a directory of fixed-size vector shards under a manifest.

Layout (format version 1):
    manifest.json            format, version, space id, dim, count, shards, copies, skipped
    names/shard-00000.parquet   one column "name": the image each row came from
    float32/shard-00000.npy     row-major vectors of one dtype ("copy"); int8 adds
    int8/shard-00000.scale.npy  a float32 per-row scale

Every file is written under a temporary name and renamed when complete; the
manifest is rewritten (also atomically) after each shard, so an interrupted
writer leaves only whole shards behind and resumes after the last one.
Shards are opened memory-mapped, so a gallery larger than RAM is streamed.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import quantize
from .errors import EngineError

FORMAT = "aml-engine-store"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 65536


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> str:
    """Write `array` as .npy under a temporary name, rename it into place; returns its sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def atomic_save_names(path: Path, names: Sequence[str]) -> str:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"name": pa.array(list(names), type=pa.string())}), tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


@dataclass(frozen=True)
class ShardView:
    """One shard of one copy: rows [start, start + rows) of the store, memory-mapped."""

    index: int
    start: int
    rows: int
    dtype: str
    vectors: np.ndarray  # rows x dim, quantize.STORAGE_DTYPE[dtype]
    scale: np.ndarray | None  # rows float32 (int8 only)

    def as_float32(self) -> np.ndarray:
        return quantize.decode(self.vectors, self.dtype, self.scale)


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Memory-map an .npy shard after checking that it is the file the manifest describes."""
    if not path.exists():
        raise EngineError("shard file is missing", path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EngineError(f"not a readable .npy shard ({e})", path) from None
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise EngineError(
            f"shard holds {arr.dtype} {arr.shape}, the manifest says {np.dtype(dtype)} {shape}", path
        )
    return arr


class Store:
    """A read-only view of a store directory. Use `open_store`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    space: str = property(lambda self: self.manifest["space"])
    dim: int = property(lambda self: int(self.manifest["dim"]))
    count: int = property(lambda self: int(self.manifest["count"]))
    complete: bool = property(lambda self: bool(self.manifest.get("complete", False)))
    dtypes: list[str] = property(lambda self: list(self.manifest["copies"]))

    @property
    def exact_dtype(self) -> str:
        """The most precise copy the store holds (float32 when present)."""
        return next(d for d in quantize.DTYPES if d in self.manifest["copies"])

    def _copy(self, dtype: str) -> list[dict]:
        copies = self.manifest["copies"]
        if dtype not in copies:
            raise EngineError(f"store has no {dtype} copy (it holds {', '.join(copies)})", self.path)
        return copies[dtype]

    def shards(self, dtype: str | None = None) -> Iterator[ShardView]:
        """Memory-mapped shards of one copy, in row order."""
        dtype = dtype or self.exact_dtype
        storage = quantize.STORAGE_DTYPE[dtype]
        for i, (shard, entry) in enumerate(zip(self.manifest["shards"], self._copy(dtype))):
            vec = _check_npy(self.path / entry["file"], (shard["rows"], self.dim), storage)
            scale = None
            if dtype == "int8":
                scale = _check_npy(self.path / entry["scale"], (shard["rows"],), np.float32)
            yield ShardView(i, shard["start"], shard["rows"], dtype, vec, scale)

    def vectors(self, dtype: str | None = None) -> np.ndarray:
        """All rows as one float32 array (count x dim), decoded from `dtype`'s copy; for stores that fit in RAM."""
        parts = [s.as_float32() for s in self.shards(dtype)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def names(self) -> list[str]:
        out: list[str] = []
        for shard in self.manifest["shards"]:
            out.extend(pq.read_table(self.path / shard["names"]).column("name").to_pylist())
        return out

    @property
    def skipped(self) -> list[dict]:
        return [s for shard in self.manifest["shards"] for s in shard.get("skipped", [])]

    def files(self) -> Iterator[tuple[Path, str]]:
        """Every data file of the store with its recorded sha256."""
        for shard in self.manifest["shards"]:
            yield self.path / shard["names"], shard["names_sha256"]
        for entries in self.manifest["copies"].values():
            for entry in entries:
                yield self.path / entry["file"], entry["sha256"]
                if "scale" in entry:
                    yield self.path / entry["scale"], entry["scale_sha256"]

    def verify(self, checksums: bool = True) -> None:
        """Raise EngineError naming the first shard that is missing, truncated, foreign or (with checksums) altered."""
        for dtype in self.dtypes:
            for _ in self.shards(dtype):
                pass
        if checksums:
            for path, digest in self.files():
                if not path.exists():
                    raise EngineError("file is missing", path)
                if sha256_file(path) != digest:
                    raise EngineError("checksum does not match the manifest (altered or corrupt shard)", path)


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not path.exists():
        raise EngineError("no such store", path)
    if not mpath.exists():
        raise EngineError(f"not a store: no {MANIFEST}", path)
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"unreadable manifest ({e})", mpath) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"not an {FORMAT} manifest", mpath)
    if manifest.get("version") != VERSION:
        raise EngineError(f"store format version {manifest.get('version')} is not supported (expected {VERSION})", mpath)
    return manifest


def open_store(path: str | Path, checksums: bool = False, allow_incomplete: bool = False) -> Store:
    """Open a store directory, checking every shard's presence, size and header (and sha256 with `checksums`)."""
    path = Path(path)
    store = Store(path, read_manifest(path))
    if not store.complete and not allow_incomplete:
        raise EngineError("store is incomplete (an interrupted encode?): rerun the same command to resume", path)
    store.verify(checksums=checksums)
    return store


class StoreWriter:
    """Appends shards to a store; reopening a store with the same source resumes after its last whole shard.

    `source_key` identifies the input (e.g. a hash of the image list): resuming with
    another input is refused rather than mixing two galleries in one store.
    """

    def __init__(
        self,
        path: str | Path,
        space: str,
        dim: int,
        dtype: str = "float32",
        shard_rows: int = DEFAULT_SHARD_ROWS,
        n_items: int | None = None,
        source_key: str | None = None,
        info: dict | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.dtype = quantize.check_dtype(dtype)
        if shard_rows <= 0:
            raise ValueError("shard_rows must be positive")
        fresh = {
            "format": FORMAT,
            "version": VERSION,
            "space": space,
            "dim": int(dim),
            "count": 0,
            "shard_rows": int(shard_rows),
            "n_items": n_items,
            "source_key": source_key,
            "complete": False,
            "info": info or {},
            "shards": [],
            "copies": {self.dtype: []},
        }
        if (self.path / MANIFEST).exists() and not overwrite:
            old = read_manifest(self.path)
            for key in ("space", "dim", "source_key", "shard_rows"):
                if old.get(key) != fresh[key]:
                    raise EngineError(
                        f"exists with another {key} ({old.get(key)!r}, not {fresh[key]!r}): "
                        "choose another --out or pass --overwrite",
                        self.path,
                    )
            if old.get("complete"):
                raise EngineError("store already exists and is complete: pass --overwrite to rebuild it", self.path)
            if list(old["copies"]) != [self.dtype]:
                raise EngineError(f"exists with copies {list(old['copies'])}, not {self.dtype}", self.path)
            self.manifest = old
        else:
            if self.path.exists() and any(self.path.iterdir()) and not (self.path / MANIFEST).exists():
                raise EngineError("exists and is not a store: refusing to write into it", self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = fresh
            self._write_manifest()
        (self.path / "names").mkdir(exist_ok=True)
        (self.path / self.dtype).mkdir(exist_ok=True)

    @property
    def items_done(self) -> int:
        """Input items covered by whole shards: the point to resume from."""
        shards = self.manifest["shards"]
        return shards[-1]["items"][1] if shards else 0

    @property
    def rows_done(self) -> int:
        return int(self.manifest["count"])

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def add_shard(
        self, vectors: np.ndarray, names: Sequence[str], items: tuple[int, int] | None = None, skipped: Sequence[dict] = ()
    ) -> None:
        """Write one shard (rows x dim float32) and record it; `items` is the input range it covers."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest["dim"]:
            raise EngineError(f"shard vectors have shape {vectors.shape}, the store's dim is {self.manifest['dim']}", self.path)
        if len(names) != len(vectors):
            raise ValueError("one name per row")
        index = len(self.manifest["shards"])
        start = self.rows_done
        if items is None:
            items = (self.items_done, self.items_done + len(vectors))
        stem = f"shard-{index:05d}"
        stored, scale = quantize.encode(vectors, self.dtype)
        entry = {"file": f"{self.dtype}/{stem}.npy"}
        entry["sha256"] = atomic_save_npy(self.path / entry["file"], stored)
        if scale is not None:
            entry["scale"] = f"{self.dtype}/{stem}.scale.npy"
            entry["scale_sha256"] = atomic_save_npy(self.path / entry["scale"], scale)
        names_file = f"names/{stem}.parquet"
        shard = {
            "start": start,
            "rows": len(vectors),
            "items": [int(items[0]), int(items[1])],
            "names": names_file,
            "names_sha256": atomic_save_names(self.path / names_file, names),
            "skipped": list(skipped),
        }
        self.manifest["shards"].append(shard)
        self.manifest["copies"][self.dtype].append(entry)
        self.manifest["count"] = start + len(vectors)
        self._write_manifest()

    def finish(self) -> Store:
        self.manifest["complete"] = True
        self._write_manifest()
        return Store(self.path, self.manifest)


def write_store(
    path: str | Path,
    vectors: np.ndarray,
    space: str,
    names: Sequence[str] | None = None,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    info: dict | None = None,
    overwrite: bool = False,
) -> Store:
    """Write in-memory vectors (N x D float32) as a complete store."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise EngineError(f"vectors must be 2-d (N x D), got shape {vectors.shape}")
    names = list(names) if names is not None else [str(i) for i in range(len(vectors))]
    writer = StoreWriter(path, space, vectors.shape[1], dtype, shard_rows, len(vectors), None, info, overwrite)
    for start in range(writer.rows_done, len(vectors), shard_rows):
        stop = min(start + shard_rows, len(vectors))
        writer.add_shard(vectors[start:stop], names[start:stop])
    return writer.finish()


def add_copy(store: Store, dtype: str) -> Store:
    """Add a `dtype` copy of every shard beside the existing ones (decoded from the exact copy)."""
    quantize.check_dtype(dtype)
    if dtype in store.dtypes:
        return store
    (store.path / dtype).mkdir(exist_ok=True)
    entries = []
    for view in store.shards(store.exact_dtype):
        stored, scale = quantize.encode(view.as_float32(), dtype)
        entry = {"file": f"{dtype}/shard-{view.index:05d}.npy"}
        entry["sha256"] = atomic_save_npy(store.path / entry["file"], stored)
        if scale is not None:
            entry["scale"] = f"{dtype}/shard-{view.index:05d}.scale.npy"
            entry["scale_sha256"] = atomic_save_npy(store.path / entry["scale"], scale)
        entries.append(entry)
    store.manifest["copies"][dtype] = entries
    atomic_write_bytes(store.path / MANIFEST, json.dumps(store.manifest, indent=1).encode())
    return store
