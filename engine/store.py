"""The gallery store: a directory of fixed-size vector shards under a manifest.

Layout (format version 1):
    manifest.json            format, version, space id, dim, count, shards, copies, skipped
    names/shard-00000.parquet   one column "name": the image each row came from
    float32/shard-00000.npy     row-major vectors of one dtype ("copy"); int8 adds
    int8/shard-00000.scale.npy  a float32 per-row scale
    deleted/gen-00003.npy    rows removed (`engine store remove`): sorted int64 row numbers (tombstones)
    maps/compact-gen-00004.npy  what `engine store compact` made of each old row number (int64, -1: removed)
    .lock                    the write lock (engine.lock): one writer at a time

Generations: each published change (an encode finishing, a copy added, rows added, removed or compacted;
engine.gallery) raises the manifest's "generation" by one. A `Store` maps every file of its generation when it
is opened, so it keeps reading that generation whole even after a later change unlinks its files.

Every file is written under a temporary name and renamed when complete (engine.files); the manifest
is rewritten (also atomically) after each shard, so an interrupted writer leaves only whole shards
behind and resumes after the last one, and a reader sees one manifest whole. A shard that is rewritten
(its images changed) gets new file names, so the published manifest never points at a half-made file.
The manifest is data from disk, never trusted: `validate_manifest` checks its whole structure (types,
paths confined to the store, shards tiling the rows, one entry per shard in every copy) when a store
is opened; file headers and sizes are checked against it before any search, content hashes on request.
Shards are opened memory-mapped, so a gallery larger than RAM is streamed.
"""
from __future__ import annotations

import itertools
import json
import mmap
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import quantize
from .errors import EngineError
from .files import save_npy, sha256_file, write_bytes, written_by
from .lock import LOCK_NAME, WriteLock, refuse_if_held

FORMAT = "aml-engine-store"
VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_SHARD_ROWS = 65536
_HEX64 = re.compile(r"[0-9a-f]{64}")


def save_names(path: Path, names: Sequence[str]) -> str:
    """The names of a shard's rows as a one-column ("name") Parquet file, written into place; returns its sha256."""
    with written_by(path) as tmp:
        pq.write_table(pa.table({"name": pa.array(list(names), type=pa.string())}), tmp)
        digest = sha256_file(tmp)
    return digest


# ---------------------------------------------------------------- the manifest, checked as data


class _Check:
    """Field checks of one manifest; every failure is one EngineError naming the manifest and the field."""

    def __init__(self, root: Path, mpath: Path):
        self.root, self.mpath = root, mpath
        self.real_root = root.resolve()

    def fail(self, field: str, problem: str):
        raise EngineError(f"manifest field {field}: {problem}", self.mpath)

    def integer(self, value, field: str, minimum: int = 0) -> int:
        # bool is an int subclass; floats and strings that look like numbers are not ints either
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer, got {value!r}")
        if value < minimum:
            self.fail(field, f"must be >= {minimum}, got {value}")
        return value

    def text(self, value, field: str, pattern: re.Pattern | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"expected a non-empty string, got {value!r}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"malformed value {value!r}")
        return value

    def type(self, value, kind: type, field: str):
        if not isinstance(value, kind):
            self.fail(field, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    def file(self, value, field: str) -> str:
        """A path inside the store: relative, no '..', and still inside once symlinks are resolved."""
        rel = self.text(value, field)
        pure = PurePosixPath(rel)
        if pure.is_absolute() or "\\" in rel or any(part in ("..", "") for part in rel.split("/")) or "\0" in rel:
            self.fail(field, f"path {rel!r} is not a plain relative path inside the store")
        if not (self.root / rel).resolve().is_relative_to(self.real_root):
            self.fail(field, f"path {rel!r} leads out of the store (through a symlink)")
        return rel


def validate_manifest(manifest, root: Path) -> dict:
    """Check a parsed manifest's whole structure against the format; returns it, or raises EngineError.

    Types of every field, a non-empty space, known dtypes, paths confined to `root`, shards tiling rows
    [0, count) and items [0, n_items) in order, and one entry per shard in every copy. Cheap: no file is read.
    """
    mpath = root / MANIFEST
    c = _Check(root, mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"not an {FORMAT} manifest", mpath)
    if manifest.get("version") != VERSION:
        raise EngineError(f"store format version {manifest.get('version')!r} is not supported (expected {VERSION})", mpath)
    c.text(manifest.get("space"), "space")
    c.integer(manifest.get("dim"), "dim", 1)
    count = c.integer(manifest.get("count"), "count")
    shard_rows = c.integer(manifest.get("shard_rows"), "shard_rows", 1)
    n_items = manifest.get("n_items")
    if n_items is not None:
        c.integer(n_items, "n_items")
    if manifest.get("source_key") is not None:
        c.text(manifest["source_key"], "source_key")
    complete = c.type(manifest.get("complete"), bool, "complete")
    c.integer(manifest.get("generation", 0), "generation")
    c.type(manifest.get("info", {}), dict, "info")
    shards = c.type(manifest.get("shards"), list, "shards")
    copies = c.type(manifest.get("copies"), dict, "copies")
    if not copies:
        c.fail("copies", "the store holds no copy of its vectors")
    seen: set[str] = set()

    def unique(rel: str, field: str) -> None:
        if rel in seen:
            c.fail(field, f"path {rel!r} is used twice")
        seen.add(rel)

    rows_before = items_before = 0
    for i, shard in enumerate(shards):
        f = f"shards[{i}]"
        c.type(shard, dict, f)
        start = c.integer(shard.get("start"), f + ".start")
        rows = c.integer(shard.get("rows"), f + ".rows")
        if start != rows_before:
            c.fail(f + ".start", f"is {start}, expected {rows_before}: shards must tile the rows in order")
        items = shard.get("items")
        if not isinstance(items, list) or len(items) != 2:
            c.fail(f + ".items", f"expected [first, end], got {items!r}")
        a, b = c.integer(items[0], f + ".items[0]"), c.integer(items[1], f + ".items[1]")
        if a != items_before or b < a or rows > b - a or b - a > shard_rows:
            c.fail(f + ".items", f"{items!r} does not follow item {items_before} with {rows} row(s) of at most {shard_rows}")
        unique(c.file(shard.get("names"), f + ".names"), f + ".names")
        c.text(shard.get("names_sha256"), f + ".names_sha256", _HEX64)
        c.type(shard.get("skipped", []), list, f + ".skipped")
        if shard.get("sources") is not None:
            c.text(shard["sources"], f + ".sources")
        rows_before += rows
        items_before = b
    if rows_before != count:
        c.fail("count", f"is {count}, the shards hold {rows_before} rows")
    if complete and n_items is not None and items_before != n_items:
        c.fail("n_items", f"is {n_items}, the shards cover {items_before} items")
    for dtype, entries in copies.items():
        if dtype not in quantize.DTYPES:
            c.fail("copies", f"unknown dtype {dtype!r} (known: {', '.join(quantize.DTYPES)})")
        c.type(entries, list, f"copies.{dtype}")
        if len(entries) != len(shards):
            c.fail(f"copies.{dtype}", f"has {len(entries)} entries for {len(shards)} shards")
        for i, entry in enumerate(entries):
            f = f"copies.{dtype}[{i}]"
            c.type(entry, dict, f)
            unique(c.file(entry.get("file"), f + ".file"), f + ".file")
            c.text(entry.get("sha256"), f + ".sha256", _HEX64)
            if dtype == "int8":
                unique(c.file(entry.get("scale"), f + ".scale"), f + ".scale")
                c.text(entry.get("scale_sha256"), f + ".scale_sha256", _HEX64)
            elif "scale" in entry:
                c.fail(f + ".scale", f"a {dtype} copy has no scale")
    deleted = manifest.get("deleted")
    if deleted is not None:
        c.type(deleted, dict, "deleted")
        unique(c.file(deleted.get("file"), "deleted.file"), "deleted.file")
        c.text(deleted.get("sha256"), "deleted.sha256", _HEX64)
        if c.integer(deleted.get("rows"), "deleted.rows", 1) > count:
            c.fail("deleted.rows", f"is {deleted['rows']}, more than the store's {count} rows")
    return manifest


def read_manifest(path: Path) -> dict:
    """The validated manifest of the store at `path` (see validate_manifest); EngineError if there is none."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.exists():
        raise EngineError("no such store", path)
    if not path.is_dir():
        raise EngineError("not a store: a file, not a folder", path)
    if not mpath.exists():
        refuse_if_held(path)  # a writer that has not yet published a manifest is named, not taken for "not a store"
        raise EngineError(f"not a store: no {MANIFEST}", path)
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise EngineError(f"unreadable manifest ({type(e).__name__}: {str(e)[:80]})", mpath) from None
    except OSError as e:
        raise EngineError(f"cannot read the manifest ({e.strerror})", mpath) from None
    return validate_manifest(manifest, path)


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


def _map_file(path: Path) -> mmap.mmap:
    """The whole file mapped read-only (no descriptor kept: the mapping outlives an unlink of the file)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class Store:
    """A read-only view of one generation of a store directory, its manifest validated. Use `open_store`.

    Files are mapped once, on first use (`open_store` maps them all), and kept: a Store goes on reading its
    generation whole after a later change (engine.gallery) replaces or unlinks those files.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._views: dict[str, list[ShardView]] = {}
        self._names: list[mmap.mmap] | None = None
        self._deleted: np.ndarray | None = None

    space: str = property(lambda self: self.manifest["space"])
    dim: int = property(lambda self: self.manifest["dim"])
    count: int = property(lambda self: self.manifest["count"])
    complete: bool = property(lambda self: self.manifest["complete"])
    dtypes: list[str] = property(lambda self: list(self.manifest["copies"]))
    # the copy its writer wrote; the others were derived from it (add_copy)
    primary_dtype: str = property(lambda self: next(iter(self.manifest["copies"])))
    # Each published change (encode, add, remove, compact) raises the generation: an open index compares it to
    # know whether to reload.
    generation: int = property(lambda self: int(self.manifest.get("generation", 0)))

    def deleted_rows(self) -> np.ndarray:
        """Row numbers removed from the gallery (`engine store remove`): sorted int64; search never returns them,
        and the other rows keep their numbers."""
        if self._deleted is None:
            self._deleted = self._load_deleted()
        return self._deleted

    def _load_deleted(self) -> np.ndarray:
        """The tombstone file, checked whole: a 1-d int64 array of `deleted.rows` increasing row numbers < count."""
        entry = self.manifest.get("deleted")
        if entry is None:
            return np.zeros(0, np.int64)
        path = self.path / entry["file"]
        if not path.exists():
            raise EngineError("deleted-rows file is missing", path)
        try:
            rows = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise EngineError(f"not a readable .npy of deleted rows ({e})", path) from None
        if rows.dtype != np.int64 or rows.shape != (entry["rows"],):
            raise EngineError(f"holds {rows.dtype} {rows.shape}, the manifest says int64 ({entry['rows']},)", path)
        if rows[0] < 0 or rows[-1] >= self.count or (np.diff(rows) <= 0).any():
            raise EngineError(f"deleted rows must be increasing row numbers in [0, {self.count})", path)
        rows.flags.writeable = False  # shared by every caller
        return rows

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
        """Memory-mapped shards of one copy, in row order, each checked against the manifest (header only)
        when first mapped."""
        dtype = dtype or self.exact_dtype
        if dtype not in self._views:
            storage = quantize.STORAGE_DTYPE[dtype]
            views = []
            for i, (shard, entry) in enumerate(zip(self.manifest["shards"], self._copy(dtype))):
                vec = _check_npy(self.path / entry["file"], (shard["rows"], self.dim), storage)
                scale = None
                if dtype == "int8":
                    scale = _check_npy(self.path / entry["scale"], (shard["rows"],), np.float32)
                views.append(ShardView(i, shard["start"], shard["rows"], dtype, vec, scale))
            self._views[dtype] = views
        yield from self._views[dtype]

    def vectors(self, dtype: str | None = None) -> np.ndarray:
        """All rows as one float32 array (count x dim), decoded from `dtype`'s copy; for stores that fit in RAM."""
        parts = [s.as_float32() for s in self.shards(dtype)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def names(self) -> list[str]:
        """The name of every row (count strings), in row order."""
        self._check_names()
        out: list[str] = []
        for mapped in self._names:
            out.extend(pq.read_table(pa.BufferReader(mapped)).column("name").to_pylist())
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
        if self.manifest.get("deleted") is not None:
            yield self.path / self.manifest["deleted"]["file"], self.manifest["deleted"]["sha256"]

    def _check_names(self) -> None:
        """Map every names file (once) after checking its Parquet footer against the manifest."""
        if self._names is not None:
            return
        mapped = []
        for shard in self.manifest["shards"]:
            path = self.path / shard["names"]
            if not path.exists():
                raise EngineError("names file is missing", path)
            try:
                data = _map_file(path)
                meta = pq.read_metadata(pa.BufferReader(data))  # the footer only
            except (OSError, ValueError, pa.ArrowException) as e:
                raise EngineError(f"not a readable Parquet names file ({str(e)[:80]})", path) from None
            if meta.num_rows != shard["rows"] or meta.schema.names != ["name"]:
                raise EngineError(f"names file holds {meta.num_rows} row(s) of {meta.schema.names}, "
                                  f"the manifest says {shard['rows']} of ['name']", path)
            mapped.append(data)
        self._names = mapped

    def verify(self, checksums: bool = True) -> None:
        """Raise EngineError naming the first file that is missing, truncated, foreign or (with checksums) altered.

        Without checksums only headers and Parquet footers are read (cheap, done on every open).
        """
        for dtype in self.dtypes:
            for _ in self.shards(dtype):
                pass
        self._check_names()
        self.deleted_rows()
        if checksums:
            for path, digest in self.files():
                if sha256_file(path) != digest:
                    raise EngineError("checksum does not match the manifest (altered or corrupt shard)", path)


OPEN_ATTEMPTS = 3  # a change that publishes while a reader opens the store makes it start over, at most this often


def open_store(path: str | Path, checksums: bool = False, allow_incomplete: bool = False) -> Store:
    """Open a store directory, checking its manifest and every file's presence, size and header (and sha256 with
    `checksums`), and mapping them all: the Store reads this generation whole from then on.

    A change that publishes a new generation and unlinks the old one's files (compact) between this reading the
    manifest and mapping them would leave a file missing: the open then starts over at the new generation.
    """
    path = Path(path)
    for attempt in itertools.count(1):
        store = Store(path, read_manifest(path))
        if not store.complete and not allow_incomplete:
            refuse_if_held(path)  # "being written" says more than "incomplete"
            raise EngineError("store is incomplete (an interrupted encode?): rerun the same command to resume", path)
        try:
            store.verify(checksums=checksums)
            return store
        except EngineError:
            if attempt == OPEN_ATTEMPTS or _published_generation(path) == store.generation:
                raise


def _published_generation(path: Path) -> int | None:
    try:
        return int(read_manifest(path).get("generation", 0))
    except EngineError:
        return None


# ---------------------------------------------------------------- writing


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise EngineError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_finite(vectors: np.ndarray, names: Sequence[str] | None, first_row: int, where: Path | None) -> None:
    """EngineError naming the first row (number `first_row` + r, and its name) holding NaN or an infinity."""
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        named = f" ({names[r]})" if names is not None else ""
        raise EngineError(f"row {first_row + r}{named} holds NaN or infinite values: refusing to store it", where)


def _is_temp_manifest(entry: Path) -> bool:
    return entry.name.startswith(MANIFEST + ".") and entry.name.endswith(".tmp")


def _is_leftover(entry: Path) -> bool:
    """What a killed writer leaves in a folder it was starting: the lock, a temporary manifest."""
    return entry.name == LOCK_NAME or _is_temp_manifest(entry)


def _take_folder(path: Path) -> WriteLock:
    """Make `path` a folder a store may be written into, and lock it for this writer.

    Refused (one EngineError, nothing created): a file, a path under a file, a folder that holds anything
    but a store (or a killed writer's leftovers).
    """
    if path.exists() and not path.is_dir():
        raise EngineError("is a file, not a store folder: choose another --out", path)
    if path.is_dir() and not (path / MANIFEST).exists() and not all(_is_leftover(e) for e in path.iterdir()):
        raise EngineError("exists and is not a store: refusing to write into it", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EngineError(f"cannot create the store folder ({e.strerror})", path) from None
    return WriteLock(path)


def referenced_files(manifest: dict) -> set[str]:
    """Every data file a manifest names (paths relative to the store)."""
    files = {s["names"] for s in manifest["shards"]}
    for entries in manifest["copies"].values():
        for e in entries:
            files.update(e[k] for k in ("file", "scale") if k in e)
    if manifest.get("deleted") is not None:
        files.add(manifest["deleted"]["file"])
    return files


# The store's own data folders and the prefix of the files a writer puts there (the cleaners' reach).
_DATA_FILES = {"names": "shard-", "deleted": "gen-", **{d: "shard-" for d in quantize.DTYPES}}


def remove_orphans(path: Path, manifest: dict) -> None:
    """Under the lock: delete data files no manifest entry names (a killed writer's) and temporary files."""
    referenced = {path / rel for rel in referenced_files(manifest)}
    for entry in path.iterdir():
        if _is_temp_manifest(entry):
            entry.unlink()
    for sub, prefix in _DATA_FILES.items():
        folder = path / sub
        if folder.is_dir() and not folder.is_symlink():
            for f in folder.iterdir():
                if f.name.startswith(prefix) and f not in referenced and not f.is_dir():
                    f.unlink()


def write_manifest(path: Path, manifest: dict) -> None:
    """Publish `manifest` as the store's at `path`, atomically (the last step of every change)."""
    write_bytes(path / MANIFEST, json.dumps(manifest, indent=1).encode())


def write_shard_files(root: Path, dtypes: Sequence[str], stem: str, vectors: np.ndarray, names: Sequence[str]) -> tuple[dict, dict]:
    """Write one shard's names and its vectors (rows x dim float32) in every copy of `dtypes` under `stem`.

    The first dtype is the store's primary copy, encoded from `vectors`; the others derive from its decoded
    values, as add_copy does. Returns (the shard's names record, {dtype: copy entry}).
    """
    primary = dtypes[0]
    stored, scale = quantize.encode(vectors, primary)
    exact = quantize.decode(stored, primary, scale)
    entries = {}
    for dtype in dtypes:
        entries[dtype] = save_copy(root, dtype, stem, *((stored, scale) if dtype == primary else quantize.encode(exact, dtype)))
    names_file = f"names/{stem}.parquet"
    return {"names": names_file, "names_sha256": save_names(root / names_file, names)}, entries


class StoreWriter:
    """Writes a store shard by shard under the store's write lock; reopening a store of the same job resumes it.

    `source_key` identifies the job (e.g. a hash of encoder and image list): resuming with another is
    refused rather than mixing two galleries in one store. The lock is held until `finish` or `close`
    (use it as a context manager); a second writer is refused with the holder's name.
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
        shard_rows = _positive_int(shard_rows, "shard_rows")
        dim = _positive_int(dim, "dim")
        if not isinstance(space, str) or not space:
            raise EngineError(f"the embedding space id must be a non-empty string, got {space!r}", self.path)
        fresh = {
            "format": FORMAT,
            "version": VERSION,
            "space": space,
            "dim": dim,
            "count": 0,
            "shard_rows": shard_rows,
            "n_items": n_items,
            "source_key": source_key,
            "complete": False,
            "info": info or {},
            "shards": [],
            "copies": {self.dtype: []},
        }
        self.lock = _take_folder(self.path)
        try:
            if (self.path / MANIFEST).exists() and not overwrite:
                old = read_manifest(self.path)
                for key in ("space", "dim", "source_key", "shard_rows"):
                    if old.get(key) != fresh[key]:
                        raise EngineError(
                            f"exists with another {key} ({old.get(key)!r}, not {fresh[key]!r}): "
                            "choose another --out or pass --overwrite",
                            self.path,
                        )
                if next(iter(old["copies"])) != self.dtype:
                    raise EngineError(f"was written as {next(iter(old['copies']))}, not {self.dtype}: pass that --dtype "
                                      "or --overwrite", self.path)
                self.manifest = old
            else:
                # an overwritten store goes on counting: an index must not take the new gallery for the old one
                fresh["generation"] = _published_generation(self.path) or 0
                self.manifest = fresh
                self._write_manifest()
            self._generation = self.manifest.get("generation", 0)
            remove_orphans(self.path, self.manifest)
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the write lock (what was written stays: a rerun resumes from it)."""
        self.lock.release()

    @property
    def shards(self) -> list[dict]:
        """The manifest's shard records so far (start, rows, items, names, sources ...)."""
        return self.manifest["shards"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def items_done(self) -> int:
        """Input items covered by whole shards: the point to resume from."""
        shards = self.manifest["shards"]
        return shards[-1]["items"][1] if shards else 0

    @property
    def rows_done(self) -> int:
        return self.manifest["count"]

    def _write_manifest(self) -> None:
        write_manifest(self.path, self.manifest)

    def _write_files(self, index: int, stem: str, vectors: np.ndarray, names: Sequence[str]) -> tuple[dict, dict]:
        """Write shard `index`'s names and every copy of its vectors under `stem`; returns (names record, copy entries)."""
        return write_shard_files(self.path, list(self.manifest["copies"]), stem, vectors, names)

    def _checked(self, vectors: np.ndarray, names: Sequence[str], first_row: int) -> np.ndarray:
        vectors = np.asarray(vectors)
        if not np.issubdtype(vectors.dtype, np.number) or np.iscomplexobj(vectors):
            raise EngineError(f"shard vectors must be real numbers, got dtype {vectors.dtype}", self.path)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.manifest["dim"]:
            raise EngineError(f"shard vectors have shape {vectors.shape}, the store's dim is {self.manifest['dim']}", self.path)
        if len(names) != len(vectors):
            raise EngineError(f"{len(names)} names for {len(vectors)} rows: one name per row", self.path)
        check_finite(vectors, names, first_row, self.path)
        return vectors

    def add_shard(
        self,
        vectors: np.ndarray,
        names: Sequence[str],
        items: tuple[int, int] | None = None,
        skipped: Sequence[dict] = (),
        sources: str | None = None,
    ) -> None:
        """Append one shard (rows x dim float32, finite) and publish it; `items` is the input range it covers,
        `sources` a fingerprint of those inputs' contents (a rerun rewrites the shard when it changes)."""
        start = self.rows_done
        vectors = self._checked(vectors, names, start)
        index = len(self.manifest["shards"])
        if items is None:
            items = (self.items_done, self.items_done + len(vectors))
        record, entries = self._write_files(index, f"shard-{index:05d}", vectors, names)
        shard = {"start": start, "rows": len(vectors), "items": [int(items[0]), int(items[1])], **record,
                 "skipped": list(skipped), "sources": sources}
        self.manifest["shards"].append(shard)
        for dtype, entry in entries.items():
            self.manifest["copies"][dtype].append(entry)
        self.manifest["count"] = start + len(vectors)
        self._write_manifest()

    def replace_shard(self, index: int, vectors: np.ndarray, names: Sequence[str], skipped: Sequence[dict], sources: str) -> None:
        """Rewrite shard `index` (its inputs changed) under new file names, publish, then delete the old files.

        The store is marked incomplete until `finish`; rows after the shard shift if its row count changed.
        """
        old = self.manifest["shards"][index]
        vectors = self._checked(vectors, names, old["start"])
        record, entries = self._write_files(index, f"shard-{index:05d}-{sources[:12]}", vectors, names)
        old_files = [old["names"]] + [e[k] for c in self.manifest["copies"].values() for e in [c[index]] for k in ("file", "scale") if k in e]
        self.manifest["shards"][index] = {**old, "rows": len(vectors), **record, "skipped": list(skipped), "sources": sources}
        for dtype, entry in entries.items():
            self.manifest["copies"][dtype][index] = entry
        start = 0
        for shard in self.manifest["shards"]:
            shard["start"] = start
            start += shard["rows"]
        self.manifest["count"] = start
        self.manifest["complete"] = False
        self._write_manifest()
        new_files = {record["names"]} | {e[k] for e in entries.values() for k in ("file", "scale") if k in e}
        for rel in old_files:
            if rel not in new_files:
                (self.path / rel).unlink(missing_ok=True)

    def finish(self) -> Store:
        """Mark the store complete, publish it as the next generation and release the lock; returns the store."""
        self.manifest["complete"] = True
        # Only a finished encode is a new generation: what an interrupted one published meanwhile was incomplete,
        # which readers refuse, so a resumed encode ends at the number an uninterrupted one does.
        self.manifest["generation"] = self._generation + 1
        self._write_manifest()
        self.close()
        return Store(self.path, self.manifest)


def save_copy(root: Path, dtype: str, stem: str, stored: np.ndarray, scale: np.ndarray | None) -> dict:
    """Write one shard of a `dtype` copy as stored (rows x dim, and the int8 per-row scale) under `stem`; its manifest entry."""
    entry = {"file": f"{dtype}/{stem}.npy"}
    entry["sha256"] = save_npy(root / entry["file"], stored)
    if scale is not None:
        entry["scale"] = f"{dtype}/{stem}.scale.npy"
        entry["scale_sha256"] = save_npy(root / entry["scale"], scale)
    return entry


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
    """Write in-memory vectors (N x D, real and finite) as a complete store; an interrupted call resumes.

    Everything is checked before the folder is touched; an existing complete store needs `overwrite`.
    """
    vectors = np.asarray(vectors)
    if not np.issubdtype(vectors.dtype, np.number) or np.iscomplexobj(vectors):
        raise EngineError(f"vectors must be real numbers, got dtype {vectors.dtype}")
    vectors = vectors.astype(np.float32, copy=False)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise EngineError(f"vectors must be 2-d (N x D, D > 0), got shape {vectors.shape}")
    names = list(names) if names is not None else [str(i) for i in range(len(vectors))]
    if len(names) != len(vectors):
        raise EngineError(f"{len(names)} names for {len(vectors)} rows: one name per row")
    check_finite(vectors, names, 0, None)
    quantize.check_dtype(dtype)
    shard_rows = _positive_int(shard_rows, "shard_rows")
    with StoreWriter(path, space, vectors.shape[1], dtype, shard_rows, len(vectors), None, info, overwrite) as writer:
        if writer.complete:
            raise EngineError("store already exists and is complete: pass --overwrite to rebuild it", path)
        for start in range(writer.rows_done, len(vectors), shard_rows):
            stop = min(start + shard_rows, len(vectors))
            writer.add_shard(vectors[start:stop], names[start:stop])
        return writer.finish()


def add_copy(store: Store | str | Path, dtype: str) -> Store:
    """Add a `dtype` copy of every shard beside the existing ones (derived from the copy the store was written in).

    Takes the write lock; an interrupted call leaves the store as it was (the copy is published at the end)
    and a rerun redoes it.
    """
    quantize.check_dtype(dtype)
    path = Path(store.path if isinstance(store, Store) else store)
    read_manifest(path)  # a missing or foreign folder is refused before a lock file is made in it
    lock = WriteLock(path)
    try:
        current = open_store(path)  # what the last writer published, read under the lock
        remove_orphans(path, current.manifest)
        if dtype in current.dtypes:
            return current
        primary = current.primary_dtype
        entries = []
        for view, entry in zip(current.shards(primary), current.manifest["copies"][primary]):
            stem = PurePosixPath(entry["file"]).stem  # the shard's own stem (a rewritten shard's carries a tag)
            entries.append(save_copy(path, dtype, stem, *quantize.encode(view.as_float32(), dtype)))
        current.manifest["copies"][dtype] = entries
        current.manifest["generation"] = current.generation + 1
        write_manifest(path, current.manifest)
        return open_store(path)
    finally:
        lock.release()
