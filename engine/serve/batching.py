"""Dynamic batching: concurrent search requests scanned as one query block.

The packed kernels are several times faster per query at Q >= 16 than at Q = 1, so single-query requests
arriving close together are worth scanning together. Requests wait in groups of equal settings (k, scan,
rescore, space): a group leaves as one block when it holds `max_batch` queries, when its oldest request
has waited `max_wait_ms`, or at once when no block is being scanned (waiting gains nothing then: the others
arrive while it scans), and only when one of the `blocks` scan slots is free, so requests arriving while
every slot scans pile up into the next block instead of queueing as single queries. Each request gets back
exactly its own rows of the block's result.

Different k are not batched together when the scan is rescored: the top k of a top-K list is exact, but
rescoring draws k x rescore candidates, so a larger K could find a better row than `engine.search` with k
would (an answer must equal the library's). With rescoring off (scan="float32" or rescore=0) the block runs
at its largest k and each request's rows are cut to its own k, which is exact.

The search itself runs in worker threads (the C++ scan releases the GIL), so the event loop keeps accepting.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import EngineError
from ..index import Index

LATENCY_WINDOW = 1000  # requests whose latency /stats summarises


@dataclass(frozen=True)
class Settings:
    """What must be equal for requests to share a block (k is None when they may differ: cut per request)."""

    k: int | None
    scan: str | None
    rescore: int | None
    space: str | None

    @classmethod
    def of(cls, k: int, scan: str | None, rescore: int | None, space: str | None) -> "Settings":
        exact_scan = scan == "float32" or rescore == 0
        return cls(None if exact_scan else k, scan, rescore, space)


@dataclass
class Hits:
    """One request's answer: scores float32 Q x k', ids int64 Q x k', names (Q lists of k' strings; None if not asked)."""

    scores: np.ndarray
    ids: np.ndarray
    names: list[list[str]] | None


@dataclass
class _Request:
    queries: np.ndarray  # Q x D float32, already checked
    k: int
    names: bool
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers `search` calls into blocks for `index.search`; runs in one event loop (start it there)."""

    def __init__(self, index: Index, max_batch: int = 64, max_wait_ms: float = 2.0, blocks: int = 2):
        self.index = index
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.blocks = blocks
        self._free = blocks
        self._paused = False
        self._pending: dict[Settings, list[_Request]] = {}
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._reloading = asyncio.Lock()  # one reload at a time: the pause is whole
        self._executor = ThreadPoolExecutor(blocks, thread_name_prefix="aml-serve")
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        self.queries = self.requests = self.block_count = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def start(self) -> None:
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def search(self, queries: np.ndarray, k: int, scan: str | None = None, rescore: int | None = None,
                     space: str | None = None, names: bool = True) -> Hits:
        """The top k of each query (checked Q x D float32), as `index.search` would answer it alone; with the
        gallery names of the ids when `names`."""
        request = _Request(queries, k, names, asyncio.get_running_loop().create_future())
        self._pending.setdefault(Settings.of(k, scan, rescore, space), []).append(request)
        self._wakeup.set()
        hits = await request.future
        self.latencies.append(time.monotonic() - request.arrived)
        return hits

    async def reload(self) -> bool:
        """index.refresh() with no block in flight (a block's ids and names come from one generation)."""
        async with self._reloading:
            self._paused = True
            try:
                while self._free < self.blocks:
                    self._drained.clear()
                    await self._drained.wait()
                return await asyncio.get_running_loop().run_in_executor(self._executor, self.index.refresh)
            finally:
                self._paused = False
                self._wakeup.set()

    def stats(self) -> dict:
        """Counters since start, and latency percentiles (ms) over the last LATENCY_WINDOW requests."""
        lat = np.array(self.latencies) * 1000.0
        return {
            "requests": self.requests, "queries": self.queries, "blocks": self.block_count,
            "mean_block": self.queries / self.block_count if self.block_count else 0.0,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if len(lat) else None,
                           "p99": float(np.percentile(lat, 99)) if len(lat) else None, "window": len(lat)},
        }

    async def _dispatch(self) -> None:
        """The batching task: start every block that is full or whose oldest request is due, while slots are free."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            for settings in sorted(self._pending, key=lambda s: self._pending[s][0].arrived):
                if not self._free or self._paused:
                    break
                group = self._pending[settings]
                left = group[0].arrived + self.max_wait - time.monotonic()
                busy = self._free < self.blocks  # an idle service gains nothing by waiting: others arrive while it scans
                if busy and sum(len(r.queries) for r in group) < self.max_batch and left > 0:
                    timeout = left if timeout is None else min(timeout, left)
                    continue
                block, rows = [], 0
                while group and (not block or rows + len(group[0].queries) <= self.max_batch):
                    rows += len(group[0].queries)
                    block.append(group.pop(0))
                if not group:
                    del self._pending[settings]
                self._free -= 1
                task = loop.create_task(self._run(settings, block))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _search(self, settings: Settings, queries: np.ndarray, k: int, names: bool) -> Hits:
        scores, ids = self.index.search(queries, k, settings.space, scan=settings.scan, rescore=settings.rescore)
        return Hits(scores, ids, self.index.names(ids) if names else None)

    async def _run(self, settings: Settings, block: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            queries = np.concatenate([r.queries for r in block]) if len(block) > 1 else block[0].queries
            hits = await loop.run_in_executor(self._executor, self._search, settings, queries, max(r.k for r in block),
                                              any(r.names for r in block))
            self.block_count += 1
            start = 0
            for r in block:
                stop = start + len(r.queries)
                self._answer(r, Hits(hits.scores[start:stop, :r.k], hits.ids[start:stop, :r.k],
                                     [row[:r.k] for row in hits.names[start:stop]] if r.names else None))
                start = stop
        except EngineError as e:
            if len(block) == 1:
                self._fail(block[0], e)
            else:  # one request's problem must not become its neighbours': each alone, to get its own answer
                for r in block:
                    try:
                        self.block_count += 1
                        self._answer(r, await loop.run_in_executor(self._executor, self._search, settings, r.queries, r.k,
                                                                   r.names))
                    except Exception as e2:  # noqa: BLE001  (handed to the request that caused it)
                        self._fail(r, e2)
        except Exception as e:  # noqa: BLE001  (an engine bug: every request of the block is told, none hangs)
            for r in block:
                self._fail(r, e)
        finally:
            self._free += 1
            if self._free == self.blocks:
                self._drained.set()
            self._wakeup.set()

    def _answer(self, request: _Request, hits: Hits) -> None:
        self.requests += 1
        self.queries += len(request.queries)
        if not request.future.done():  # the client may have gone
            request.future.set_result(hits)

    def _fail(self, request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)
