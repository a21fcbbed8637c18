"""Exact top-k by inner product over a store: one kernel call per memory-mapped shard, merged here.

Backends answer the same contract, (scores float32 Q x k', ids int64 Q x k'), best first, ties by lower id:
  engine  the C++ module `engine._search` (blocked SIMD kernel, its own thread pool, GIL released);
  faiss   faiss IndexFlatIP per shard (GPU when faiss has one), the baseline it is measured against;
  torch   torch matmul + topk per shard, on the CPU or a CUDA device (`device`): the GPU search path.
A compressed copy (float16, bfloat16, int8) scans faster; its k * rescore best candidates are then
rescored against the float32 copy, so returned scores and order are float32-exact whenever the true top k
is among the candidates (the benchmark reports how often: recall@100 >= 0.999 at the default factor).
Every result row holds distinct real rows of the gallery, whatever the vectors hold: a NaN score (a gallery
row holding NaN, or inf times 0) ranks after every number, by lower id (the torch backend may report such a
row's score as -inf). Rows a store marks deleted (`Store.deleted_rows`) are never returned; the others keep
their ids. One implementation: `search`, `search_stores` and the resident `engine.Index` all run
`search_sources` over (store, shard views) sources, the one-shot calls mapping each shard as they reach it.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from . import quantize
from .checks import check_int
from .errors import EngineError
from .store import ShardView, Store

BACKENDS = ("engine", "faiss", "torch")
# Fastest first (bytes scanned per row); each is made exact by rescoring against float32.
SCAN_PREFERENCE = ("int8", "bfloat16", "float16", "float32")
DEFAULT_RESCORE = 4


def check_queries(store: Store, queries: np.ndarray, k: int, space: str | None = None) -> np.ndarray:
    """Validate queries against a store before any work; returns them as C-contiguous float32 (Q x D)."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2:
        raise EngineError(f"queries must be a Q x D array, got shape {q.shape}")
    if q.shape[1] != store.dim:
        raise EngineError(f"queries have D = {q.shape[1]}, the store has D = {store.dim}", store.path)
    if space and store.space and space != store.space:
        raise EngineError(f"queries are in space {space!r}, the store in {store.space!r}: asymmetric search needs one space", store.path)
    check_int(k, "k")
    if store.count == 0:
        raise EngineError("store is empty", store.path)
    if not np.issubdtype(q.dtype, np.number) or np.iscomplexobj(q):
        raise EngineError(f"queries must be real numbers, got dtype {q.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
        raise EngineError(f"query {bad} holds NaN or infinite values (or overflows float32)")
    return q


def check_gallery(stores: Sequence[Store]) -> None:
    """Stores searched as one gallery: at least one, all of one D and one embedding space."""
    if not stores:
        raise EngineError("no stores given")
    first = stores[0]
    for other in stores[1:]:
        if other.dim != first.dim:
            raise EngineError(f"store has D = {other.dim}, {first.path} has D = {first.dim}", other.path)
        if other.space != first.space:
            raise EngineError(f"store is in space {other.space!r}, {first.path} in {first.space!r}", other.path)


def check_threads(threads: int, backend: str) -> None:
    """threads: 0 (all cores) or a count, at most the engine's limit (engine._search.MAX_THREADS)."""
    check_int(threads, "threads", minimum=0, note="0 = all cores")
    if backend == "engine":
        from . import _search

        if threads > _search.MAX_THREADS:
            raise EngineError(f"threads must be at most {_search.MAX_THREADS}, got {threads}")


def check_result_size(nq: int, k: int, count: int) -> int:
    """k' = min(k, count), the result's width; refuses a Q x k' result (with its merge buffers) beyond memory."""
    width = min(k, count)
    need = nq * width * 48  # ids + scores, twice while merging, and the scan's candidates
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not reported here: no bound
        return width
    if need > memory:
        raise EngineError(
            f"k = {k} asks for {nq} x {width} results, about {need / 2**30:.1f} GiB, more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory: ask for a smaller k or fewer queries"
        )
    return width


def torch_device(device: str):
    """The torch device `device` names: "cpu" or an existing "cuda[:N]" (index made explicit); else an EngineError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EngineError(f"unknown device {device!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise EngineError(f"device {device!r} is not available here: expected cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise EngineError(f"device {device!r} is not available here: no CUDA device (use cpu)")
    if (dev.index or 0) >= torch.cuda.device_count():
        raise EngineError(f"device {device!r} is not available here: this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    return torch.device("cuda", dev.index or 0)


def check_device(backend: str, device: str) -> None:
    """Only the torch backend runs on a chosen device, and that device is a CUDA device that exists."""
    if device == "cpu":
        return
    if backend != "torch":
        raise EngineError(f"backend {backend!r} does not take a device: --device {device} needs --backend torch")
    torch_device(device)


def plan_scan(store: Store, scan: str | None = None, rescore: int | None = None) -> tuple[str, int]:
    """Which copy to scan and the rescoring factor: (dtype, r), r = 0 meaning the scan's scores are returned.

    Defaults: the most compact copy the store holds, rescored by DEFAULT_RESCORE against float32 when it has
    that copy; without a float32 copy, its most precise copy unrescored (the most exact it allows).
    """
    has_exact = "float32" in store.dtypes
    if scan is None:
        scan = next(d for d in SCAN_PREFERENCE if d in store.dtypes) if has_exact else store.exact_dtype
    elif scan not in quantize.DTYPES:
        raise EngineError(f"unknown scan dtype {scan!r}: expected one of {', '.join(quantize.DTYPES)}")
    elif scan not in store.dtypes:
        raise EngineError(
            f"store has no {scan} copy (it holds {', '.join(store.dtypes)}): add one with engine.store.add_copy", store.path
        )
    if rescore is None:
        rescore = DEFAULT_RESCORE if has_exact and scan != "float32" else 0
    check_int(rescore, "rescore", minimum=0)
    if scan == "float32":
        rescore = 0
    if rescore and not has_exact:
        raise EngineError("rescoring needs a float32 copy, which this store lacks: pass rescore=0", store.path)
    return scan, int(rescore)


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's (score, id) pairs (Q x c each): score descending, ties by lower id, NaN last.

    The one ordering of every result (the C++ kernel's too). Returns (scores float32 Q x min(k, c), ids int64).
    """
    order = np.lexsort((ids, -scores), axis=1)[:, :k]  # lexsort puts NaN after every number
    return np.take_along_axis(scores, order, 1).astype(np.float32, copy=False), np.take_along_axis(ids, order, 1)


def merge_topk(scores_a, ids_a, scores_b, ids_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-query top lists (Q x ka, Q x kb) into the k best (best_k's order)."""
    return best_k(np.concatenate([scores_a, scores_b], axis=1), np.concatenate([ids_a, ids_b], axis=1), k)


def _rescore_np(q: np.ndarray, ids: np.ndarray, exact: ShardView, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (Q x c local rows) rescored in float32 against the exact shard; the k best."""
    rows = np.asarray(exact.vectors[ids.reshape(-1)], dtype=np.float32).reshape(*ids.shape, -1)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf rows score NaN / inf, ranked by best_k
        scores = np.einsum("qd,qcd->qc", q, rows).astype(np.float32)
    return best_k(scores, ids, k)


def _real_rows(scores: np.ndarray, ids: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A baseline's (scores, ids) with every id a distinct row of the shard: places it left empty (faiss's -1
    when NaN scores kept rows out) take the lowest rows not listed, at score NaN."""
    empty = (ids < 0) | (ids >= rows)
    if not empty.any():
        return scores, ids
    scores, ids = scores.copy(), ids.copy()
    for r in np.flatnonzero(empty.any(axis=1)):  # only on galleries holding NaN: O(rows) per such query
        free = np.setdiff1d(np.arange(rows), ids[r][~empty[r]])[: int(empty[r].sum())]
        ids[r, empty[r]], scores[r, empty[r]] = free, np.nan
    return scores, ids


def _faiss_shard(q: np.ndarray, view: ShardView, k: int, threads: int):
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(view.as_float32())
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), view.vectors.shape[1])
    else:
        index = faiss.IndexFlatIP(view.vectors.shape[1])
    index.add(x)
    return index.search(q, k)


SCORE_BLOCK_BYTES = 1 << 30  # the torch backend's Q x rows score block, bounded on any device


def _torch_shard(q: np.ndarray, view: ShardView, k: int, threads: int, device: str):
    """Scores in float32 (TF32 off on CUDA: the same ranking as on the CPU), in query blocks of bounded size.

    On CUDA a float16 copy crosses the bus as float16 and is widened there; other copies cross as float32.
    """
    import torch

    dev = torch.device(device)
    rows = view.vectors if dev.type == "cuda" and view.dtype == "float16" else view.as_float32()
    with warnings.catch_warnings():  # a read-only memory map: the tensor over it is only read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(rows).to(dev).float()
    block = max(1, SCORE_BLOCK_BYTES // (4 * view.rows))
    old_threads, old_tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False

    def top(qb):  # torch.topk ranks NaN first: selected as -inf instead (infinities kept as they are)
        s = torch.from_numpy(qb).to(dev) @ x.T
        return torch.topk(torch.nan_to_num(s, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf), k, dim=1)

    try:
        parts = [top(q[a:a + block]) for a in range(0, len(q), block)]
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return torch.cat([s for s, _ in parts]).cpu().numpy(), torch.cat([i for _, i in parts]).cpu().numpy()


def _search_shard(q, view, exact, k, rescore, backend, threads, isa, device):
    """Top-k of one shard, ids local to it."""
    if backend == "engine":
        from . import _search

        return _search.search_shard(
            q, view.vectors, view.dtype, k, scale=view.scale, exact=None if exact is None else exact.vectors,
            rescore=rescore, threads=threads, isa=isa,
        )
    c = min(view.rows, k * rescore if exact is not None else k)
    s, i = _faiss_shard(q, view, c, threads) if backend == "faiss" else _torch_shard(q, view, c, threads, device)
    s, i = _real_rows(s, i.astype(np.int64), view.rows)
    if exact is not None:
        return _rescore_np(q, i, exact, k)
    return best_k(s, i, k)  # the baselines' ties are in no set order


def _search_live(q, view, exact, k, rescore, gone, backend, threads, isa, device):
    """Top-k of one shard's rows but `gone` (its deleted rows, sorted local row numbers), ids local to it.

    With d rows deleted the shard is asked for k + d (at most its rows): dropping the deleted leaves at least
    k rows, or every live row, so the result is the live rows' own top k (in best_k's order).
    """
    if not len(gone):
        return _search_shard(q, view, exact, k, rescore, backend, threads, isa, device)
    s, i = _search_shard(q, view, exact, min(view.rows, k + len(gone)), rescore, backend, threads, isa, device)
    deleted = gone[np.minimum(np.searchsorted(gone, i), len(gone) - 1)] == i
    keep = np.argsort(deleted, axis=1, kind="stable")[:, : min(k, view.rows - len(gone))]  # live ones, in order
    return np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)


@dataclass(frozen=True)
class Source:
    """One store as a search reads it.

    store: the opened store (its D, space and copies); offset: the global id of its row 0 (the rows of the
    stores before it); shards(dtype): its shard views of one copy, in row order (mapped as the search reaches
    them, or held open by an Index; a subset of the store's shards is allowed); rows: the rows those shards
    hold; deleted: sorted int64 row numbers of the store, within those shards, that are never returned.
    """

    store: Store
    offset: int
    shards: Callable[[str], Iterable[ShardView]]
    rows: int
    deleted: np.ndarray

    @property
    def live(self) -> int:
        """The rows a search may return."""
        return self.rows - len(self.deleted)

    def pairs(self, scan: str, rescore: int) -> Iterator[tuple[ShardView, ShardView | None, np.ndarray]]:
        """Each shard of the scanned copy with, when rescoring, the same shard of the float32 copy, and its
        deleted rows (sorted, local to the shard)."""
        exact = iter(self.shards("float32")) if rescore else None
        for view in self.shards(scan):
            lo, hi = np.searchsorted(self.deleted, [view.start, view.start + view.rows])
            yield view, next(exact) if exact is not None else None, self.deleted[lo:hi] - view.start


def store_sources(stores: Sequence[Store]) -> list[Source]:
    """The stores as one gallery for a single search: every shard, mapped when the search reaches it."""
    out, offset = [], 0
    for store in stores:
        deleted = np.asarray(store.deleted_rows(), dtype=np.int64)
        out.append(Source(store, offset, store.shards, store.count, deleted))
        offset += store.count
    return out


def search_sources(
    sources: Sequence[Source],
    queries: np.ndarray,
    k: int,
    space: str | None = None,
    scan: str | None = None,
    rescore: int | None = None,
    backend: str = "engine",
    threads: int = 0,
    isa: str = "auto",
    device: str = "cpu",
    resident=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over sources taken as one gallery: the one search that `search`, `search_stores` and `Index` run.

    Options as in `search`, each store planning its own scan (plan_scan). resident: the sources held on a
    device (engine.resident.ResidentGallery, built by a device Index): it scores instead of the host kernels,
    taking only scan (its own dtype) and rescore. Every error is raised before any work.
    Returns (scores float32 Q x k', ids int64 Q x k'), k' = min(k, rows not deleted), ids being
    `source.offset` + the store's row number; deleted rows are never returned.
    """
    check_gallery([src.store for src in sources])
    plans = []
    for src in sources:
        q = check_queries(src.store, queries, k, space)
        if resident is None:
            plans.append(plan_scan(src.store, scan, rescore))
    if resident is not None:
        if (backend, threads, isa, device) != ("engine", 0, "auto", "cpu"):
            raise EngineError(f"a device index searches on {resident.device}: backend, threads, isa and device are "
                              "options of the host search")
        r = resident.plan_rescore(scan, rescore)
    elif backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    else:
        check_threads(threads, backend)
        check_device(backend, device)
    live = sum(src.live for src in sources)
    if live == 0:
        raise EngineError("every row of the gallery was removed: nothing to search", sources[0].store.path)
    k = check_result_size(len(q), int(k), live)
    if resident is not None:
        return resident.search(q, k, r)
    scores = np.zeros((len(q), 0), np.float32)
    ids = np.zeros((len(q), 0), np.int64)
    for src, (dtype, r) in zip(sources, plans):
        if src.live == 0:
            continue
        ks = min(k, src.live)
        r = min(r, -(-src.live // ks))  # ks * r <= live + ks: no overflow downstream
        for view, exact, gone in src.pairs(dtype, r):
            if view.rows == len(gone):
                continue
            s, i = _search_live(q, view, exact, ks, r, gone, backend, int(threads), isa, device)
            scores, ids = merge_topk(scores, ids, s, i + (src.offset + view.start), k)
    return scores, ids


def search(
    store: Store,
    queries: np.ndarray,
    k: int,
    space: str | None = None,
    scan: str | None = None,
    rescore: int | None = None,
    backend: str = "engine",
    threads: int = 0,
    isa: str = "auto",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows of `store` for each query by inner product.

    queries: Q x D float32 (a single D vector is taken as Q = 1); space: the queries' embedding-space id,
    refused if it differs from the store's. scan: which copy to scan (float32, float16, bfloat16, int8);
    rescore: r, rescore the scan's k * r best per shard against the float32 copy (0 = return the scan's
    scores); both default to the fastest exact setting the store allows (see plan_scan). backend: engine,
    faiss or torch; threads: 0 = all cores; isa: the engine's instruction set (auto or one of
    engine._search.isa_levels()); device: where the torch backend scores ("cpu", "cuda", "cuda:1"; faiss uses
    its GPU build by itself when it has one). Shards are memory-mapped one at a time, never the whole store.
    Returns (scores float32 Q x k', ids int64 Q x k'), k' = min(k, rows not deleted), best first, ties by
    lower id (NaN scores last), ids being distinct row numbers of the store, never a deleted one
    (`store.deleted_rows()`). Any k >= 1 is accepted: one above the store's count is taken as the count, and a
    rescoring factor beyond the count's worth of candidates as that (k * rescore never needs more than every
    row); a result larger than this machine's memory is refused. A one-shot use of `search_sources`.
    """
    return search_sources(store_sources([store]), queries, k, space, scan, rescore, backend, threads, isa, device)


def search_stores(
    stores: Sequence[Store], queries: np.ndarray, k: int, space: str | None = None, **options
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over several stores taken as one gallery, their rows concatenated in the order given.

    All stores must share D and embedding space. Options are those of `search`. Returns (scores float32
    Q x k', ids int64 Q x k'), k' = min(k, total rows not deleted); an id is a global row number over the
    concatenation: row r of stores[s] has id sum(stores[:s].count) + r (`np.searchsorted` on the cumulative
    counts recovers the store). A one-shot use of `search_sources`.
    """
    check_gallery(stores)
    return search_sources(store_sources(stores), queries, k, space, **options)
