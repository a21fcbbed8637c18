"""A gallery held by torch on a device ("cuda", "cuda:1", or "cpu" for the same code on the host): upload once,
score query blocks by matmul, keep each query's best candidates, rescore them exactly in float32.

What is held: the live, finite rows of every source (deleted rows are left out; a row whose scanned copy holds
NaN or inf is answered on the host, see below) as one float16 / bfloat16 / float32 matrix in row order, and a
float32 copy for the rescoring when the memory budget allows both (otherwise the rescoring reads the store's
exact copy in host memory; a float32 matrix is its own rescoring copy, held once). A gallery beyond the budget is held in host chunks (pinned on CUDA) and streamed
through two device buffers, the copy of chunk i + 1 running on a side stream while chunk i is scored.
A search: each query block times each chunk in the scan dtype (tensor cores on CUDA: fp16 / bf16 inputs, fp32
accumulation), the c = k * max(r, 1) best per query kept across chunks, those rescored as float32 dot
products (elementwise multiply and sum: never TF32), then ordered by score, ties by lower id, NaN last.
Scores are therefore always the float32 ones of the exact copy (the float32 copy, else the store's most precise),
whatever the scan; the result equals the engine's exact top-k wherever scores are not tied and the true top k
is among the c candidates (rescore = r). Rows whose scanned copy is not finite (NaN, inf, or float16 overflow)
are never scanned: every search scores them on the host against the exact copy and merges them in.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import quantize
from .checks import check_int
from .errors import EngineError
from .search import DEFAULT_RESCORE, merge_topk, torch_device

DEVICE_DTYPES = ("float16", "bfloat16", "float32")
WORK_BYTES = 1 << 30  # score blocks and rescoring gathers, at most (and at most a quarter of the budget)
CUDA_BUDGET_FRACTION = 0.9  # of the device's free memory when no budget is given


def default_dtype(stores) -> str:
    """float16, unless every store holds a bfloat16 copy and no float16 one (then it is uploaded as stored)."""
    if all("bfloat16" in s.dtypes and "float16" not in s.dtypes for s in stores):
        return "bfloat16"
    return "float16"


def _torch_dtype(dtype: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def _as_tensor(rows: np.ndarray, dtype: str):
    """Host rows (the storage of `dtype`: bfloat16 as uint16 bits) as a CPU tensor of that dtype, no copy."""
    import torch

    with warnings.catch_warnings():  # a read-only memory map: the tensor over it is only read
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "bfloat16":
            return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(rows)


def scan_rows(store, views: dict, index: int, dtype: str):
    """Shard `index`'s rows as a host tensor of `dtype`: the store's copy of that dtype when it has one, else its
    float32 copy (or most precise one) rounded to it."""
    import torch

    if dtype in store.dtypes:
        view = views[dtype][index]
        return _as_tensor(view.vectors, dtype)
    view = views[store.exact_dtype][index]
    return torch.from_numpy(np.ascontiguousarray(view.as_float32())).to(_torch_dtype(dtype))


def finite_rows(rows) -> np.ndarray:
    """Which rows of a host tensor hold only finite values (bool per row); float16 / bfloat16 by their exponent
    bits (an integer test, many times faster on the CPU than torch.isfinite on those dtypes)."""
    import torch

    if rows.dtype in (torch.float16, torch.bfloat16):
        ones = 0x7C00 if rows.dtype == torch.float16 else 0x7F80  # the exponent field all ones: inf or NaN
        return ((rows.view(torch.int16) & ones) != ones).all(dim=1).numpy()
    return torch.isfinite(rows).all(dim=1).numpy()


def _exact_rows(view, keep: np.ndarray) -> np.ndarray:
    """The kept rows of an exact shard view as float32 (the mapped rows themselves when all are kept)."""
    if keep.all():
        return quantize.decode(view.vectors, view.dtype, view.scale)
    return quantize.decode(view.vectors[keep], view.dtype, None if view.scale is None else view.scale[keep])


@dataclass(frozen=True)
class Plan:
    """Where the rows go under a memory budget (bytes): resident (every scanned row on the device at once, else
    streamed in chunks of chunk_rows), exact_resident (the float32 copy on the device too), query_rows (queries
    scored at once against a chunk) and work (bytes of score blocks and rescoring gathers)."""

    resident: bool
    exact_resident: bool
    chunk_rows: int
    work: int

    def query_rows(self, rows: int, width: int) -> int:
        """Queries per block when each takes `rows` values of `width` bytes."""
        return max(1, self.work // max(1, rows * width))


def plan_memory(rows: int, dim: int, dtype: str, budget: int | None) -> Plan:
    """The plan for `rows` x `dim` scanned rows of `dtype` (and their float32 copy) under `budget` bytes (None:
    no limit). Refuses a budget that cannot hold two chunks of one row beside the work space."""
    elem = 4 if dtype == "float32" else 2
    # A float32 scan copy is the exact copy itself (the same rows, decoded the same way): rescoring reads it.
    scan, exact = rows * dim * elem, 0 if dtype == "float32" else rows * dim * 4
    if budget is None:
        return Plan(True, True, max(rows, 1), WORK_BYTES)
    work = min(WORK_BYTES, budget // 4)
    if scan + exact + work <= budget:
        return Plan(True, True, max(rows, 1), work)
    if scan + work <= budget:
        return Plan(True, False, max(rows, 1), work)
    chunk = (budget - work) // (2 * dim * elem)
    if chunk < 1:
        raise EngineError(f"device_memory = {budget} bytes cannot hold two chunks of one {dim}-d row and the scores")
    return Plan(False, False, int(chunk), work)


class HostRows:
    """Rows of the sources' exact copies by global id, read from host memory (mapped or held shards)."""

    def __init__(self, parts: list[tuple[int, object]], dim: int):
        self.starts = np.array([start for start, _ in parts], np.int64)
        self.views = [view for _, view in parts]
        self.dim = dim

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of global `ids` (any shape S) -> S x D."""
        flat = ids.reshape(-1)
        out = np.empty((len(flat), self.dim), np.float32)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        for w in np.unique(which):
            view, sel = self.views[w], np.flatnonzero(which == w)
            local = flat[sel] - self.starts[w]
            out[sel] = quantize.decode(view.vectors[local], view.dtype, None if view.scale is None else view.scale[local])
        return out.reshape(*ids.shape, self.dim)


def order_topk(scores, pos, k: int):
    """Per row of (scores float32 B x c, pos int64 B x c, distinct per row): the k best by score descending, ties
    by lower pos, NaN last (engine.search.best_k's order, as torch ops on any device). Returns (scores, pos) B x k."""
    import torch

    order = torch.argsort(pos, dim=1, stable=True)
    pos, scores = pos.gather(1, order), scores.gather(1, order)
    nan = torch.isnan(scores)
    key = torch.where(nan, torch.full_like(scores, -torch.inf), scores)
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    pos, scores, nan = pos.gather(1, order), scores.gather(1, order), nan.gather(1, order)
    order = torch.argsort(nan.to(torch.uint8), dim=1, stable=True)[:, :k]
    return scores.gather(1, order), pos.gather(1, order)


class ResidentGallery:
    """One generation of sources (engine.search.Source) held by torch on `device` for searching.

    dtype: the scanned copy's dtype on the device (DEVICE_DTYPES; None: default_dtype); budget: device bytes it
    may take (None: 90% of a CUDA device's free memory, no limit on the CPU). Built once per generation; never
    changed afterwards, so any number of threads may search it at once.
    """

    def __init__(self, sources: Sequence, device: str = "cuda", dtype: str | None = None, budget: int | None = None):
        import torch

        self.device = torch_device(device)
        self.dtype = default_dtype([s.store for s in sources]) if dtype is None else dtype
        if self.dtype not in DEVICE_DTYPES:
            raise EngineError(f"a device index holds float16, bfloat16 or float32, not {self.dtype!r}")
        if budget is not None:
            check_int(budget, "device_memory", minimum=1)
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * CUDA_BUDGET_FRACTION)
        self.dim = sources[0].store.dim
        host, ids, exact_parts, kept, bad = [], [], [], [], []
        for src in sources:
            views = {d: list(src.shards(d)) for d in src.store.dtypes}
            for n, view in enumerate(views[src.store.exact_dtype]):
                exact_view = views["float32"][n] if "float32" in views else view
                exact_parts.append((src.offset + view.start, exact_view))
                rows = scan_rows(src.store, views, n, self.dtype)
                keep = np.ones(view.rows, bool)
                lo, hi = np.searchsorted(src.deleted, [view.start, view.start + view.rows])
                keep[src.deleted[lo:hi] - view.start] = False
                finite = finite_rows(rows)
                gid = np.arange(view.rows, dtype=np.int64) + (src.offset + view.start)
                bad.append(gid[keep & ~finite])
                keep &= finite
                if not keep.all():
                    rows = rows[torch.from_numpy(keep)]
                host.append(rows)
                ids.append(gid[keep])
                kept.append((exact_view, keep))
        self.exact_host = HostRows(exact_parts, self.dim)
        self.ids = np.concatenate(ids)  # device row -> global id, ascending
        bad_ids = np.concatenate(bad)
        # Rows outside the scan: those whose exact copy holds NaN always score NaN, the others are scored per search.
        bad_rows = self.exact_host.take(bad_ids) if len(bad_ids) else np.zeros((0, self.dim), np.float32)
        nan = np.isnan(bad_rows).any(axis=1)
        self.nan_ids, self.odd_ids, self.odd_rows = bad_ids[nan], bad_ids[~nan], bad_rows[~nan]
        self.rows = len(self.ids)
        self.plan = plan_memory(self.rows, self.dim, self.dtype, budget)
        self.exact = None
        self._streaming = threading.Lock()  # one streamed scan at a time: two buffers per scan fit the budget
        try:
            if self.plan.resident:
                self.chunks = [self._upload(host, self.rows)] if self.rows else []
                if self.plan.exact_resident and self.dtype == "float32":
                    self.exact = self.chunks[0] if self.rows else None
                elif self.plan.exact_resident:
                    parts = (_as_tensor(_exact_rows(view, keep), "float32") for view, keep in kept)
                    self.exact = self._upload(parts, self.rows, torch.float32)
            else:
                self.chunks = self._host_chunks(host)
        except torch.cuda.OutOfMemoryError:
            raise EngineError(f"{self.rows} x {self.dim} {self.dtype} rows do not fit on {self.device} within "
                              f"device_memory = {budget} bytes (other processes may hold some): pass a smaller "
                              "device_memory to stream the gallery through it") from None

    def _upload(self, parts, rows: int, dtype=None):
        """Host tensors (row blocks) into one device matrix, block by block (no host-side concatenation)."""
        import torch

        out = torch.empty((rows, self.dim), dtype=dtype or _torch_dtype(self.dtype), device=self.device)
        a = 0
        for p in parts:
            out[a:a + len(p)].copy_(p.to(out.dtype))
            a += len(p)
        return out

    def _host_chunks(self, parts) -> list:
        """The scanned rows regrouped into host chunks of plan.chunk_rows (pinned on CUDA, for async copies)."""
        import torch

        size, pin = self.plan.chunk_rows, self.device.type == "cuda"
        try:
            chunks = [torch.empty((min(size, self.rows - a), self.dim), dtype=_torch_dtype(self.dtype), pin_memory=pin)
                      for a in range(0, self.rows, size)]
        except RuntimeError as e:
            raise EngineError(f"cannot pin {self.rows * self.dim * 2} bytes of host memory for streaming ({e})") from None
        row = 0
        for part in parts:
            done = 0
            while done < len(part):
                c, off = divmod(row, size)
                n = min(len(part) - done, size - off)
                chunks[c][off:off + n] = part[done:done + n]
                done, row = done + n, row + n
        return chunks

    def _scanned(self) -> Iterator[tuple[int, object]]:
        """(first device row, device tensor) per chunk: the resident matrix, or each host chunk copied into one of
        two device buffers; on CUDA the copy of the next chunk runs on a side stream while this one is scored."""
        if self.plan.resident:
            yield from ((0, c) for c in self.chunks)
            return
        with self._streaming:
            yield from self._streamed()

    def _streamed(self, cuda: bool | None = None) -> Iterator[tuple[int, object]]:
        """_scanned's streaming; cuda: overlap the copies by a side stream and events (None: on a CUDA device)."""
        import torch

        cuda = self.device.type == "cuda" if cuda is None else cuda
        bufs = [torch.empty((self.plan.chunk_rows, self.dim), dtype=_torch_dtype(self.dtype), device=self.device)
                for _ in range(2)]
        side = torch.cuda.Stream(self.device) if cuda else None
        done = [None, None]  # CUDA: an event after the last scoring of each buffer

        def issue(i):
            buf = bufs[i % 2][: len(self.chunks[i])]
            if not cuda:
                return buf.copy_(self.chunks[i]), None
            with torch.cuda.stream(side):
                if done[i % 2] is not None:
                    side.wait_event(done[i % 2])  # its previous chunk's scoring has finished
                buf.copy_(self.chunks[i], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            return buf, ready

        try:
            pending = issue(0) if self.chunks else None
            for i in range(len(self.chunks)):
                buf, ready = pending
                if cuda:
                    torch.cuda.current_stream(self.device).wait_event(ready)
                if i + 1 < len(self.chunks):
                    pending = issue(i + 1)
                yield i * self.plan.chunk_rows, buf
                if cuda:
                    done[i % 2] = torch.cuda.Event()
                    done[i % 2].record(torch.cuda.current_stream(self.device))
        finally:
            if cuda:
                side.synchronize()  # no copy may outlive its buffer

    def plan_rescore(self, scan: str | None, rescore: int | None) -> int:
        """r for a search: scan, when given, must be the device's dtype; rescore defaults to DEFAULT_RESCORE
        (1 for a float32 scan)."""
        if scan is not None and scan != self.dtype:
            raise EngineError(f"this index holds the {self.dtype} copy on {self.device}: scan={scan!r} needs an index "
                              f"opened with device_dtype={scan!r}")
        if rescore is None:
            return 1 if self.dtype == "float32" else DEFAULT_RESCORE
        check_int(rescore, "rescore", minimum=0)
        return int(rescore)

    def search(self, q: np.ndarray, k: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of checked queries (Q x D float32) with rescoring factor r: (scores float32 Q x k', ids int64
        Q x k'), k' = min(k, rows held), in engine.search.best_k's order."""
        import torch

        c = min(self.rows, k * max(r, 1))
        width = min(k, self.rows)
        scores = np.zeros((len(q), width), np.float32)
        ids = np.zeros((len(q), width), np.int64)
        if self.rows:
            with torch.inference_mode():
                qd = _as_tensor(q, "float32").to(self.device)  # for the rescoring (the caller's array may be read-only)
                cand = self._candidates(q, c)
                for a, b, s, p in self._rescored(qd, cand, width):
                    scores[a:b], ids[a:b] = s, self.ids[p]
        return self._merge_host_rows(q, k, scores, ids)

    def _candidates(self, q: np.ndarray, c: int) -> list:
        """Per query block [(a, b, scan scores B x c, device rows B x c)]: the c best of the scan over all chunks."""
        import torch

        qb = self.plan.query_rows(min(self.rows, self.plan.chunk_rows), 4)
        blocks = [(a, min(a + qb, len(q))) for a in range(0, len(q), qb)]
        scaled = self._scan_queries(q)
        qt = [scaled[a:b] for a, b in blocks]
        best: list = [None] * len(blocks)
        for start, chunk in self._scanned():
            for j, x in enumerate(qt):
                s = x @ chunk.T
                v, p = torch.topk(s, min(c, len(chunk)), dim=1, sorted=False)
                p = p + start
                if best[j] is not None:  # merge with the chunks before
                    v, p = torch.cat([best[j][0], v], 1), torch.cat([best[j][1], p], 1)
                    v, sel = torch.topk(v, min(c, v.shape[1]), dim=1, sorted=False)
                    p = p.gather(1, sel)
                best[j] = (v, p)
        return [(a, b, *best[j]) for j, (a, b) in enumerate(blocks)]

    def _scan_queries(self, q: np.ndarray):
        """Queries in the scan dtype, each scaled to a largest |value| of 1 (the ranking is the same; no float16
        overflow, the most significant bits kept)."""
        import torch

        top = np.maximum(np.abs(q).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return torch.from_numpy(q / top).to(self.device).to(_torch_dtype(self.dtype))

    def _rescored(self, q, cand: list, width: int) -> Iterator:
        """(a, b, scores float32, device rows) on the host per query sub-block: candidates rescored as float32 dot
        products from the exact copy (on the device, or gathered from host memory), then ordered (order_topk)."""
        import torch

        for a, b, _, pos in cand:
            sub = self.plan.query_rows(pos.shape[1] * self.dim, 8)  # the rows gathered and their products
            for s0 in range(0, b - a, sub):
                p = pos[s0:s0 + sub]
                qt = q[a + s0:a + s0 + len(p)]
                if self.exact is not None:
                    rows = self.exact[p]
                else:
                    rows = torch.from_numpy(self.exact_host.take(self.ids[p.cpu().numpy()])).to(self.device)
                s = (rows * qt[:, None, :]).sum(dim=2)
                s, p = order_topk(s, p, width)
                yield a + s0, a + s0 + len(p), s.cpu().numpy(), p.cpu().numpy()

    def _merge_host_rows(self, q, k, scores, ids):
        """Merge in the rows kept off the device (non-finite scanned copy): those scored on the host, and the first
        k of those whose exact copy holds NaN (NaN for every query, ranked last by lower id)."""
        if not len(self.nan_ids) and not len(self.odd_ids):
            return scores, ids
        with np.errstate(invalid="ignore", over="ignore"):
            odd = np.einsum("qd,nd->qn", q, self.odd_rows).astype(np.float32)
        nan = self.nan_ids[:k]
        extra_s = np.concatenate([odd, np.full((len(q), len(nan)), np.nan, np.float32)], axis=1)
        extra_i = np.broadcast_to(np.concatenate([self.odd_ids, nan]), extra_s.shape)
        return merge_topk(scores, ids, extra_s, np.ascontiguousarray(extra_i), k)
