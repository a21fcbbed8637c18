"""Encoding images into vectors: threads decode while the runner infers, results go to a store or an .npy.

`encode_items` is the one loop; `encode_to_store` (resumable, shard by shard) and
`encode_to_array` are its two sinks. Items are (path, bbx or None) pairs: queries
carry their box and are cropped before encoding.

Decoding runs in threads, not forked processes: Pillow releases the GIL while it decodes and
resizes, and a forked worker cost more than it hid (bench/bench_encode.py, bench/RESULTS.md): its
start-up, the shared-memory hand-over of every image, and copy-on-write faults on the parent's
pages (the runner's activations) for as long as it lived.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backends import Runner, make_runner
from .checks import check_float, check_int
from .errors import EngineError
from .distributed import Group
from .files import save_npy, sha256_file, write_text
from .device_decode import Jpeg, decode_fitted, read_jpeg
from .images import DEFAULT_MAX_SIDE, read_image
from .models import Encoder, weights_hash
from .multiscale import describe, scale_network
from .progress import JobProgress
from .store import DEFAULT_SHARD_ROWS, MANIFEST, Store, StoreWriter, open_store, read_manifest

Item = tuple[Path, Sequence[float] | None]
DECODE_PLACES = ("auto", "host", "device")  # EncodeOptions.decode


@dataclass
class EncodeOptions:
    """How images become vectors. scales: multi-scale factors (METHOD.md), 1.0 alone for single scale.

    workers: decoding threads (0: decode in the calling thread, between forward passes).
    backend: the runner (engine.backends: "auto", "torch", "onnxruntime", "tensorrt"); compile: torch.compile
    for the torch backend; cache_dir: where exported ONNX / TensorRT files are cached (None: the default).
    window: decoded images held back at most, in batches, to gather batches of one image size.
    decode: where JPEGs are decoded and resized, one of DECODE_PLACES: "host" (Pillow, in the threads), "device"
    (engine.device_decode on the runner's device: nvJPEG on CUDA; the threads only read bytes), "auto" (the
    device on CUDA, else the host). Other formats are always decoded on the host.
    The runner does not change the job's identity (`describe`): backends agree within 1e-4.
    """

    max_side: int = DEFAULT_MAX_SIDE
    batch_size: int = 8
    workers: int = 1
    scales: tuple[float, ...] = (1.0,)
    skip_bad: bool = False
    device: str = "cpu"
    progress: bool | None = None  # None: only when stderr is a terminal
    label: str = "encoding"
    backend: str = "auto"
    compile: bool = False
    cache_dir: str | None = None
    window: int = 4
    decode: str = "auto"

    def __post_init__(self):  # refused where the options are made, whether or not any item is encoded
        if self.decode not in DECODE_PLACES:
            raise EngineError(f"decode must be one of {', '.join(DECODE_PLACES)}, got {self.decode!r}")

    def describe(self) -> dict:
        return {"max_side": self.max_side, "scales": list(self.scales)}


def _read(item: Item, max_side: int, on_device: bool = False) -> tuple[np.ndarray | Jpeg | None, str | None]:
    """Decode one item; a failure is returned as a message (so the caller can name or skip it), not raised.
    on_device: a JPEG the device decodes is only read (a device_decode.Jpeg), not decoded."""
    try:
        if on_device and (jpeg := read_jpeg(item[0])) is not None:
            return jpeg, None
        return read_image(item[0], max_side, item[1]), None
    except EngineError as e:
        return None, str(e)


def _on_device(chunk: list, items: Sequence[Item], max_side: int, device: torch.device) -> list:
    """(index, image or Jpeg or None, error) triples with each Jpeg decoded and fitted on `device`; one the
    decoder refuses is decoded (or its failure named) on the host."""
    at = [k for k, (_, v, _) in enumerate(chunk) if isinstance(v, Jpeg)]
    if not at:
        return chunk
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():  # this thread's current device
        fitted = decode_fitted([chunk[k][1] for k in at], [items[chunk[k][0]][1] for k in at],
                               [items[chunk[k][0]][0] for k in at], max_side, device)
    chunk = list(chunk)
    for k, done in zip(at, fitted):
        i = chunk[k][0]
        chunk[k] = (i, *(done if done is not None else _read(items[i], max_side)))
    return chunk


def decode_in_order(
    items: Sequence[Item], max_side: int, workers: int, ahead: int, device: torch.device | None = None
) -> Iterator[tuple[int, np.ndarray | torch.Tensor | None, str | None]]:
    """Yield (index, H x W x 3 uint8 image or None, error or None) for every item, in order.

    workers > 0: that many threads decode up to `ahead` items past the one being consumed, overlapping the
    consumer's work; 0: each item is decoded when it is asked for. Closing the generator cancels what is queued.
    device: JPEGs are read by the threads and decoded on `device` (engine.device_decode), `ahead // 2` at a time
    by one more thread, a batch ahead of the consumer: their images are tensors on `device`; None: all on the host.
    """
    if device is None:
        yield from _read_in_order(items, max_side, workers, ahead, False)
        return
    size = max(1, ahead // 2)
    decoder = ThreadPoolExecutor(1, thread_name_prefix="aml-device-decode")
    queue: deque = deque()
    try:
        with closing(_read_in_order(items, max_side, workers, ahead, True)) as read:
            chunk = []
            for triple in read:
                chunk.append(triple)
                if len(chunk) == size:
                    queue.append(decoder.submit(_on_device, chunk, items, max_side, device))
                    chunk = []
                    if len(queue) > 1:
                        yield from queue.popleft().result()
            if chunk:
                queue.append(decoder.submit(_on_device, chunk, items, max_side, device))
        while queue:
            yield from queue.popleft().result()
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)


def _read_in_order(items: Sequence[Item], max_side: int, workers: int, ahead: int, on_device: bool) -> Iterator[tuple]:
    """`decode_in_order`'s threads: (index, `_read`'s result) in order."""
    if workers <= 0:
        for i, item in enumerate(items):
            yield i, *_read(item, max_side, on_device)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="aml-decode")
    queue: deque = deque()
    try:
        for i, item in enumerate(items):
            queue.append((i, pool.submit(_read, item, max_side, on_device)))
            if len(queue) > ahead:
                j, done = queue.popleft()
                yield j, *done.result()
        while queue:
            j, done = queue.popleft()
            yield j, *done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def to_batch(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """Same-sized H x W x 3 uint8 images -> B x 3 x H x W float32 in [0, 1] on `device` (load_image's values).

    CUDA: the pixels cross as uint8 (a quarter of float32's bytes) from pinned memory, asynchronously, and
    are scaled there. CPU: contiguous NCHW, which onnxruntime takes without another copy, in one numpy pass
    per image (cast, reorder and divide: 2-3x faster than torch's strided uint8 -> float copy and a division).
    """
    if any(isinstance(img, torch.Tensor) for img in images):  # decoded on the device (engine.device_decode)
        u8 = [img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img)) for img in images]  # a host fallback
        x = torch.stack([img.to(device) for img in u8]).permute(0, 3, 1, 2).float().div_(255.0)
        return x if device.type == "cuda" else x.contiguous()
    if device.type == "cuda":
        u8 = torch.from_numpy(np.stack(images)).pin_memory().to(device, non_blocking=True)
        return u8.permute(0, 3, 1, 2).float().div_(255.0)
    out = np.empty((len(images), 3, *images[0].shape[:2]), np.float32)
    for k, img in enumerate(images):
        np.divide(img.transpose(2, 0, 1), np.float32(255.0), out=out[k], dtype=np.float32)
    return torch.from_numpy(out)


class ShapeBuckets:
    """Decoded images waiting for a forward pass, grouped by shape (only equal shapes share a batch).

    A bucket leaves as soon as it holds `batch_size` images; while more than `window` images wait,
    the bucket holding the oldest one leaves part-full, which bounds memory and the output's delay.
    """

    def __init__(self, batch_size: int, window: int):
        self.batch_size = max(1, batch_size)
        self.window = max(self.batch_size, window)
        self.groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        self.count = 0

    def add(self, i: int, img: np.ndarray | torch.Tensor) -> None:
        """Queue item i's image (any array with a `shape`: H x W x 3 uint8 in `encode_items`)."""
        self.groups.setdefault(tuple(img.shape), []).append((i, img))
        self.count += 1

    def pop_ready(self, flush: bool = False) -> list[list[tuple[int, np.ndarray]]]:
        """Groups of (item index, image) to run now: full batches, then the oldest buckets past the window (all if flush)."""
        out = []
        for shape in list(self.groups):
            group = self.groups[shape]
            while len(group) >= self.batch_size:
                out.append(group[: self.batch_size])
                del group[: self.batch_size]
            if not group:
                del self.groups[shape]
        self.count -= sum(len(g) for g in out)
        while self.groups and (flush or self.count > self.window):
            oldest = min(self.groups, key=lambda shape: self.groups[shape][0][0])
            group = self.groups.pop(oldest)
            self.count -= len(group)
            out.append(group)
        return out


def encode_items(
    encoder: Encoder, items: Sequence[Item], opts: EncodeOptions, runner: Runner | None = None,
    progress: JobProgress | None = None,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield (index, vector (D,) float32 or None, error or None) for every item, in order.

    A failed item raises EngineError unless `opts.skip_bad`, in which case it is yielded with its error.
    `opts.workers` threads decode and resize while the runner (`opts.backend`, or `runner` when given) encodes;
    images of equal size are gathered across up to `opts.window` batches to share forward passes.
    progress: the job's bar (engine.progress) that the items count towards; None: a bar of these items alone.
    """
    if runner is None:
        runner = make_runner(scale_network(encoder, opts.scales), opts.backend, torch.device(opts.device),
                             compile=opts.compile, cache_dir=opts.cache_dir)
    buckets = ShapeBuckets(opts.batch_size, opts.window * opts.batch_size)
    results: dict[int, tuple] = {}
    next_i = 0
    # Decoded images queued ahead: the next batches are ready when a forward pass ends.
    ahead = 2 * max(opts.batch_size, opts.workers)
    on_device = opts.decode == "device" or (opts.decode == "auto" and runner.device.type == "cuda")
    decoding = decode_in_order(items, opts.max_side, opts.workers, ahead, runner.device if on_device else None)
    bar = nullcontext(progress) if progress is not None else JobProgress(None, [len(items)], opts.label, opts.progress)
    with bar as progress, closing(decoding) as decoded:

        def run(groups):
            for group in groups:
                vecs = describe(encoder, to_batch([img for _, img in group], runner.device), opts.scales, runner)
                for (i, _), v in zip(group, vecs.float().cpu().numpy()):
                    if np.isfinite(v).all():
                        results[i] = (v, None)
                    elif opts.skip_bad:
                        results[i] = (None, f"{items[i][0]}: the encoder gave NaN or infinite values")
                    else:
                        raise EngineError("the encoder gave NaN or infinite values for this image "
                                          "(pass --skip-bad to record it and go on)", items[i][0])

        def drain():
            # Results come back out of order (buckets); hand them on in order as soon as they are contiguous.
            nonlocal next_i
            start = next_i
            while next_i in results:
                yield next_i, *results.pop(next_i)
                next_i += 1
            if next_i > start:
                progress.advance(next_i - start)

        for i, img, err in decoded:
            if err is None:
                buckets.add(i, img)
            elif opts.skip_bad:
                results[i] = (None, err)
            else:
                # the images before it are encoded first, so that the shards they complete are kept for a rerun
                run(buckets.pop_ready(flush=True))
                yield from drain()
                raise EngineError(err + " (pass --skip-bad to record it and go on)")
            run(buckets.pop_ready())
            yield from drain()
        run(buckets.pop_ready(flush=True))
        yield from drain()


def encode_to_array(
    encoder: Encoder, items: Sequence[Item], opts: EncodeOptions, runner: Runner | None = None, group: Group | None = None
) -> tuple[np.ndarray, list[int], list[dict]] | None:
    """All items in memory: (vectors N' x D float32, indices of the encoded items, skipped [{item, path, error}]).

    runner: an already built runner (engine.backends.make_runner) to reuse; None: one is made from `opts`.
    group: several processes (engine.distributed) each encode a contiguous share of whole batches and rank 0 gathers
    them (queries are small: they cross over the group, not through files): the result on rank 0, None elsewhere.
    """
    if group is None or group.world == 1:
        return _encode_array(encoder, items, opts, runner, None)
    # shares of whole batches: the batches (and so, on some kernels, the last bits of each vector) are one process's
    batches = -(-len(items) // opts.batch_size)
    bounds = [min(len(items), batches * r // group.world * opts.batch_size) for r in range(group.world + 1)]
    a, b = bounds[group.rank], bounds[group.rank + 1]
    with JobProgress(group, [y - x for x, y in zip(bounds, bounds[1:])], opts.label, opts.progress) as progress:
        vecs, kept, skipped = _encode_array(encoder, items[a:b], opts, runner, progress)
        progress.finish()
        shares = group.gather((vecs, [a + i for i in kept], [{**s, "item": a + s["item"]} for s in skipped]))
    if shares is None:
        return None
    return (np.concatenate([s[0] for s in shares]), [i for s in shares for i in s[1]],
            [e for s in shares for e in s[2]])


def _encode_array(encoder: Encoder, items: Sequence[Item], opts: EncodeOptions, runner: Runner | None,
                  progress: JobProgress | None) -> tuple[np.ndarray, list[int], list[dict]]:
    """`encode_to_array` in this process: (vectors N' x D float32, indices of the encoded items, skipped)."""
    vecs, kept, skipped = [], [], []
    for i, v, err in encode_items(encoder, items, opts, runner, progress) if items else ():
        if v is None:
            skipped.append({"item": i, "path": str(items[i][0]), "error": err})
        else:
            vecs.append(v)
            kept.append(i)
    array = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, encoder.dim), np.float32)
    return array, kept, skipped


def source_key(encoder: Encoder, items: Sequence[Item], opts: EncodeOptions) -> str:
    """Identifies an encode job (encoder weights, image list, boxes, resolution): resuming needs the same key.

    The images' contents are not part of it: they are fingerprinted per shard (`item_sources`), so that a
    rerun rewrites exactly the shards whose images changed.
    """
    h = hashlib.sha256()
    # the weights themselves: students trained towards one teacher share its space id and their name
    h.update(json.dumps([encoder.space, encoder.name, weights_hash(encoder), opts.describe()]).encode())
    for path, bbx in items:
        h.update(f"{path}|{list(bbx) if bbx is not None else ''}\n".encode())
    return h.hexdigest()[:32]


def item_sources(items: Sequence[Item]) -> str:
    """A fingerprint of the items' files as they are now: path, box, size and mtime (ns) of each (stat only).

    An image replaced under the same name changes it; a missing file has its own mark (its encode will fail).
    """
    h = hashlib.sha256()
    for path, bbx in items:
        try:
            st = os.stat(path)
            mark = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            mark = "missing"
        h.update(f"{path}|{list(bbx) if bbx is not None else ''}|{mark}\n".encode())
    return h.hexdigest()[:32]


def encode_shards(encoder: Encoder, items: Sequence[Item], names: Sequence[str], opts: EncodeOptions, runner: Runner | None,
                  ranges: Sequence[tuple[int, int]], shards: Sequence[int], emit, progress: JobProgress | None = None) -> None:
    """Encode shards `shards` (indices into `ranges`, each shard's item range) in one stream, handing each to
    `emit(j, vectors rows x D float32, names, skipped [{item, path, error}])` as soon as it is whole.
    progress: the job's bar (engine.progress); None: a bar of these shards' items."""
    pending = [i for j in shards for i in range(*ranges[j])]
    ends = {ranges[j][1] - 1: j for j in shards}  # last item of each shard -> its index
    vecs, kept, skipped = [], [], []
    for pos, (_, v, err) in enumerate(encode_items(encoder, [items[i] for i in pending], opts, runner, progress) if pending else ()):
        i = pending[pos]
        if v is None:
            skipped.append({"item": i, "path": str(items[i][0]), "error": err})
        else:
            vecs.append(v)
            kept.append(i)
        if i in ends:
            emit(ends[i], np.stack(vecs) if vecs else np.zeros((0, encoder.dim), np.float32), [names[k] for k in kept], skipped)
            vecs, kept, skipped = [], [], []


def _shards_to_write(writer: StoreWriter, items: Sequence[Item], shard_rows: int) -> tuple[list, list, list[int]]:
    """(each shard's item range, each shard's `item_sources`, the shards to write: changed ones, then missing ones)."""
    ranges = [(a, min(a + shard_rows, len(items))) for a in range(0, len(items), shard_rows)]
    sources = [item_sources(items[a:b]) for a, b in ranges]
    todo = [j for j, shard in enumerate(writer.shards) if shard.get("sources") != sources[j]]
    return ranges, sources, todo + list(range(len(writer.shards), len(ranges)))


def _publish_shard(writer: StoreWriter, j: int, items: tuple[int, int], sources: str, vectors, names, skipped) -> None:
    """Shard j into the store: a rewrite of a changed shard, or the next one appended (shards are written in order)."""
    if j < len(writer.shards):
        writer.replace_shard(j, vectors, names, skipped, sources)
    else:
        writer.add_shard(vectors, names, items, skipped, sources)


def encode_to_store(
    encoder: Encoder,
    items: Sequence[Item],
    names: Sequence[str],
    out: str | Path,
    opts: EncodeOptions,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    dtype: str = "float32",
    overwrite: bool = False,
    rebuild_stale: bool = False,
    runner: Runner | None = None,
    group: Group | None = None,
) -> Store:
    """Encode items into a store shard by shard, under the store's write lock.

    Shard j holds items [j * shard_rows, (j + 1) * shard_rows) (less those skipped). A rerun of the same job
    resumes at the first missing shard and rewrites exactly the shards whose images changed since they were
    encoded (size or mtime); a complete, unchanged store is returned as it is. A store of another job (other
    weights, image list or resolution) is an error, or is rebuilt with `rebuild_stale` (for folders the
    caller owns as a cache). runner: an already built runner to reuse; None: one is made from `opts`.
    group: the processes sharing the job (engine.distributed; None: torchrun's, or this process alone): with
    several, each encodes its share of the shards (`_encode_in_parts`) and the store is the same, byte for byte.
    """
    if len(items) == 0:
        raise EngineError("nothing to encode: the image list is empty")
    info = {"encoder": encoder.config, "encode": opts.describe()}
    key = source_key(encoder, items, opts)
    if group is None:
        group = Group()
    if not overwrite and rebuild_stale and (Path(out) / MANIFEST).exists():
        overwrite = read_manifest(Path(out)).get("source_key") != key
    if group.world > 1 or (Path(out) / PARTS).is_dir():
        return _encode_in_parts(encoder, items, names, Path(out), opts, shard_rows, dtype, overwrite, runner, group, info, key)
    with StoreWriter(out, encoder.space, encoder.dim, dtype, shard_rows, len(items), key, info, overwrite) as writer:
        ranges, sources, todo = _shards_to_write(writer, items, shard_rows)
        if not todo and writer.complete:
            return Store(writer.path, writer.manifest)  # the same job, the same images: nothing to do
        encode_shards(encoder, items, names, opts, runner, ranges, todo,
                      lambda j, *shard: _publish_shard(writer, j, ranges[j], sources[j], *shard))
        return writer.finish()


# ---------------------------------------------------------------- one store, written by several processes

PARTS = "parts"  # inside the store: shards encoded by any rank, waiting for rank 0 to commit them
COMMIT_POLL_S = 0.5  # how often rank 0's commit looks for the next part while the ranks encode


def _part_paths(out: Path, j: int) -> tuple[Path, Path]:
    stem = out / PARTS / f"shard-{j:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _write_part(out: Path, j: int, key: str, sources: str, items: tuple[int, int], vectors: np.ndarray,
                names: list[str], skipped: list[dict]) -> None:
    """Shard j's vectors (.npy) and then its record (.json, naming the vectors' sha256), each written into place:
    a record exists only once its vectors are whole."""
    npy, record = _part_paths(out, j)
    sha = save_npy(npy, np.ascontiguousarray(vectors, dtype=np.float32))
    write_text(record, json.dumps({"source_key": key, "sources": sources, "items": list(items), "sha256": sha,
                                   "names": names, "skipped": skipped}))


def _read_part(out: Path, j: int, key: str, sources: str, dim: int) -> tuple[np.ndarray, list, list] | None:
    """Shard j's part as (vectors rows x dim float32, names, skipped) if it is this job's, for these images, and
    its vectors' bytes are those its record names; None otherwise (it is encoded again)."""
    npy, record = _part_paths(out, j)
    try:
        r = json.loads(record.read_bytes())
        if not (isinstance(r, dict) and r.get("source_key") == key and r.get("sources") == sources
                and isinstance(r.get("names"), list) and all(isinstance(n, str) for n in r["names"])
                and isinstance(r.get("skipped"), list) and sha256_file(npy) == r.get("sha256")):
            return None
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if vectors.dtype != np.float32 or vectors.shape != (len(r["names"]), dim):
        return None
    return vectors, r["names"], r["skipped"]


class _Committer(threading.Thread):
    """Rank 0's commit, beside its own encoding: each part goes into the store in the plan's order as soon as it
    and every part before it are whole, so that the commit ends soon after the last part, instead of starting
    then; a committed part is deleted (the published manifest holds it, and a rerun does not look for it)."""

    def __init__(self, writer: StoreWriter, out: Path, plan: dict, key: str, dim: int):
        super().__init__(name="aml-commit", daemon=True)
        self.writer, self.out, self.plan, self.key, self.dim = writer, out, plan, key, dim
        self.written = threading.Event()  # every rank's parts are written: a part still missing is an error
        self.stopped = threading.Event()  # the job failed: keep what is committed, commit nothing more
        self.error: BaseException | None = None

    def run(self) -> None:
        ranges, sources = self.plan["ranges"], self.plan["sources"]
        try:
            for j in self.plan["todo"]:
                while (part := _read_part(self.out, j, self.key, sources[j], self.dim)) is None:
                    if self.stopped.is_set():
                        return
                    if self.written.is_set():
                        raise EngineError(f"shard {j}'s part changed or vanished while the job ran: run it again", self.out / PARTS)
                    self.written.wait(COMMIT_POLL_S)
                if self.stopped.is_set():
                    return
                _publish_shard(self.writer, j, ranges[j], sources[j], *part)
                for f in _part_paths(self.out, j):
                    f.unlink(missing_ok=True)
        except BaseException as e:  # raised again in the main thread, by `finish`
            self.error = e

    def finish(self) -> None:
        """Once every part is written: wait for the commit's end; its error, if any, is raised here."""
        self.written.set()
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """The job failed: stop after the shard being published (the store stays whole, for a rerun)."""
        self.stopped.set()
        self.written.set()
        self.join()


def _encode_in_parts(encoder, items, names, out: Path, opts: EncodeOptions, shard_rows, dtype, overwrite, runner,
                     group: Group, info: dict, key: str) -> Store:
    """`encode_to_store` by a job of `group.world` processes, the job as a whole being the store's one writer.

    Rank 0 takes the store's write lock (a second job is refused on every rank) and plans: the shards to
    (re)write, less those a killed run left whole in parts/, shared round-robin among the ranks. Each rank
    encodes its shards into parts/ (vectors, then a record with their sha256); meanwhile rank 0 commits the
    parts in the image list's order through the one StoreWriter (`_Committer`), so the store (ids, names, bytes)
    is the one a single process writes, and publishes it complete once every rank is done. A rerun with any
    number of processes (1 too) keeps the shards committed, trusts only parts whose bytes match their record,
    and encodes the rest.
    """
    writer = plan = None
    if group.leader:
        try:
            writer = StoreWriter(out, encoder.space, encoder.dim, dtype, shard_rows, len(items), key, info, overwrite)
            ranges, sources, todo = _shards_to_write(writer, items, shard_rows)
            need = [j for j in todo if _read_part(out, j, key, sources[j], encoder.dim) is None]
            plan = {"ranges": ranges, "sources": sources, "todo": todo, "need": need}
        except EngineError as e:
            if writer is not None:
                writer.close()
            group.broadcast({"error": (str(e.args[0]), e.path)})
            raise
    plan = group.broadcast(plan)
    if "error" in plan:
        raise EngineError(plan["error"][0], plan["error"][1])
    ranges, sources = plan["ranges"], plan["sources"]
    shares = [plan["need"][r::group.world] for r in range(group.world)]
    committer = None
    if group.leader and (plan["todo"] or not writer.complete):  # else the same job, the same images: nothing to do
        committer = _Committer(writer, out, plan, key, encoder.dim)
        committer.start()
    try:
        with JobProgress(group, [sum(ranges[j][1] - ranges[j][0] for j in share) for share in shares], opts.label,
                         opts.progress) as progress:
            encode_shards(encoder, items, names, opts, runner, ranges, shares[group.rank],
                          lambda j, *shard: _write_part(out, j, key, sources[j], ranges[j], *shard), progress)
            progress.finish()
            group.barrier()  # every part is written
        if committer is not None:
            committer.finish()
    except BaseException:
        if committer is not None:
            committer.abort()
        if writer is not None:
            writer.close()  # what was written stays, for a rerun
        raise
    store = None
    if group.leader:
        try:
            if committer is not None:
                shutil.rmtree(out / PARTS, ignore_errors=True)  # still under the lock: every part is in the manifest
                store = writer.finish()
            else:
                store = Store(writer.path, writer.manifest)
        finally:
            writer.close()
    group.barrier()  # the store is published
    return store if group.leader else open_store(out)


def store_encoder(store_path: str | Path, encoder: Encoder | None = None) -> Encoder:
    """The encoder that made a store, rebuilt from its manifest (`info.encoder`): a registry teacher by name.

    Any other (a checkpoint, a cirtorch teacher, random weights) cannot be rebuilt from a name: pass it as
    `encoder`. Either way it must give the store's space id (its weights and head), or an EngineError says so.
    A store of imported vectors (`engine store import`) records no encoder and is refused.
    """
    from .models import TEACHERS, build

    path = Path(store_path)
    m = read_manifest(path)
    config = m.get("info", {}).get("encoder")
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise EngineError("records no encoder (its vectors were imported, not encoded): images cannot be added to it", path)
    if encoder is None:
        if config.get("role") != "teacher" or config["name"] not in TEACHERS:
            raise EngineError(f"was encoded by {config['name']!r}, which is not a registry teacher: pass that encoder "
                              "(--model checkpoint:PATH or cirtorch:PATH)", path)
        try:
            encoder = build(config["name"])
        except EngineError as e:
            raise EngineError(f"cannot rebuild its encoder {config['name']!r} ({e}): pass it with --model", path) from None
    if encoder.space != m["space"] or encoder.dim != m["dim"]:
        raise EngineError(f"the encoder gives space {encoder.space!r} (D = {encoder.dim}), the store holds {m['space']!r} "
                          f"(D = {m['dim']}): only the store's own encoder can add to it", path)
    return encoder


def store_options(store_path: str | Path, opts: EncodeOptions | None = None) -> EncodeOptions:
    """`opts` (how to run: batch, workers, device, runner) with the store's own encoding (max_side, scales from
    its manifest's `info.encode`), checked as data."""
    from .images import MIN_SIDE

    path = Path(store_path)
    recorded = read_manifest(path).get("info", {}).get("encode")
    if not isinstance(recorded, dict):
        raise EngineError("records no encoding options (its vectors were imported, not encoded)", path)
    max_side = check_int(recorded.get("max_side"), "the manifest's info.encode.max_side", MIN_SIDE, path=path)
    scales = recorded.get("scales")
    if not isinstance(scales, list) or not scales:
        raise EngineError(f"the manifest's info.encode.scales must be a non-empty list, got {scales!r}", path)
    scales = tuple(check_float(s, "the manifest's info.encode.scales", 0, open_min=True, path=path) for s in scales)
    return dataclasses.replace(opts or EncodeOptions(), max_side=max_side, scales=scales)


def add_images(
    store_path: str | Path,
    items: Sequence[Item],
    names: Sequence[str],
    opts: EncodeOptions | None = None,
    encoder: Encoder | None = None,
    runner: Runner | None = None,
) -> Store:
    """Encode new images with the store's own encoder and options and append them, every copy in step, as one
    new generation (engine.gallery), under the store's write lock.

    items / names: as for `encode_to_store`; a name the store already holds (and has not removed) is refused,
    nothing written. opts: how to run (its max_side and scales are replaced by the store's); encoder: see
    `store_encoder`. New shards hold the store's shard size of items each. An interrupted add leaves the
    store as it was; rerunning it does the whole add. Returns the new generation, opened.
    """
    from .gallery import Change, check_new_names

    names = list(names)
    if len(names) != len(items):
        raise EngineError(f"{len(names)} names for {len(items)} images: one name per image", store_path)
    with Change(store_path) as change:
        check_new_names(change, names)  # before the encoder is built: a refusal costs nothing
        encoder = store_encoder(store_path, encoder)
        opts = store_options(store_path, opts)
        rows = change.manifest["shard_rows"]
        ends = {min(a + rows, len(items)) - 1 for a in range(0, len(items), rows)}
        vecs, kept, skipped, first = [], [], [], 0
        for i, v, err in encode_items(encoder, items, opts, runner):
            if v is None:
                skipped.append({"item": change.items_done + i, "path": str(items[i][0]), "error": err})
            else:
                vecs.append(v)
                kept.append(names[i])
            if i in ends:
                array = np.stack(vecs) if vecs else np.zeros((0, encoder.dim), np.float32)
                change.append_shard(array, kept, i + 1 - first, skipped)
                vecs, kept, skipped, first = [], [], [], i + 1
        return change.publish()


# ---------------------------------------------------------------- query vectors as .npy + JSON sidecar


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def save_vectors(path: str | Path, vectors: np.ndarray, meta: dict) -> Path:
    """Vectors (Q x D float32) as .npy with a JSON sidecar (`<path>.json`: space, dim, encoder, names, skipped),
    each written into place (engine.files). A folder at `path`, or a file where its folder should be, is an EngineError."""
    path = Path(path)
    if path.is_dir():
        raise EngineError("is a folder: an .npy output needs a file name", path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise EngineError(f"cannot write here: {parent} is a file, not a folder", path)
            break
    save_npy(path, np.asarray(vectors, dtype=np.float32))
    write_text(sidecar_path(path), json.dumps(meta, indent=1))
    return path


def _check_sidecar(meta, side: Path, vectors: np.ndarray) -> dict:
    """A query sidecar is a JSON object whose known fields have their types; one EngineError naming the field otherwise."""
    if not isinstance(meta, dict):
        raise EngineError(f"sidecar must be a JSON object, got {type(meta).__name__}", side)
    dim = meta.get("dim")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise EngineError(f"sidecar field dim must be an integer, got {dim!r}", side)
    if dim is not None and dim != vectors.shape[1]:
        raise EngineError(f"sidecar says D = {dim}, the array has D = {vectors.shape[1]}", side)
    space = meta.get("space")
    if space is not None and (not isinstance(space, str) or not space):
        raise EngineError(f"sidecar field space must be a non-empty string, got {space!r}", side)
    names = meta.get("names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise EngineError("sidecar field names must be a list of strings", side)
        if len(names) != len(vectors):
            raise EngineError(f"sidecar names {len(names)} rows, the array has {len(vectors)}", side)
    return meta


def load_vectors(path: str | Path) -> tuple[np.ndarray, dict]:
    """(vectors Q x D float32, metadata) from an .npy (+ optional sidecar) or a store directory.

    Refused with one EngineError naming the file: arrays that are not real numbers (complex, strings, objects,
    structured), not 2-d, holding NaN or infinite values (or values beyond float32), and malformed sidecars.
    """
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
    if not isinstance(vectors, np.ndarray) or vectors.dtype.kind not in "fiu":
        kind = "an .npz archive" if not isinstance(vectors, np.ndarray) else f"dtype {vectors.dtype}"
        raise EngineError(f"vectors must be a real-number array (float or integer), got {kind}", path)
    if vectors.ndim != 2:
        raise EngineError(f"vectors must be a Q x D array, got shape {vectors.shape}", path)
    with np.errstate(over="ignore"):
        vectors = vectors.astype(np.float32, copy=False)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise EngineError(f"row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values (or overflows float32)", path)
    meta = {}
    side = sidecar_path(path)
    if side.exists():
        try:
            meta = json.loads(side.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise EngineError(f"unreadable sidecar ({type(e).__name__}: {str(e)[:80]})", side) from None
        meta = _check_sidecar(meta, side, vectors)
    return vectors, meta


def default_workers() -> int:
    """Decoding threads: one per two cores, at least one, so inference keeps the rest."""
    return max(1, (os.cpu_count() or 2) // 2)
