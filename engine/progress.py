"""One progress bar for a whole job, of one process or of several (engine.distributed.Group).

Every rank counts the items it has finished; the ranks other than 0 publish their count to the job's
key-value store (torchrun's rendezvous store, `Group.store`) and rank 0 reads them from a thread. No
collective is involved, so ranks with unequal work never wait for each other here, and a rank that fails
only stops its count from moving (torchrun then ends the job).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

POLL_S = 0.5  # how often rank 0 reads the others' counts, and how often a rank publishes its own at most


class JobProgress:
    """Items done by every rank of a job, drawn on rank 0 as one bar: done / total, images/s, ETA, per-rank counts.

    group: the job's processes (None: this process alone; a group without a known store counts this rank alone).
    totals: each rank's number of items, in rank order (every rank knows them from the job's plan).
    enabled: draw the bar (None: only when stderr is a terminal); console: where (None: stderr).
    Use as a context manager. Each rank calls `advance(n)` as items finish and `finish()` once its own work is
    done, before the job's final meeting (a barrier or a gather); rank 0's `counts` (items per rank, in rank
    order), read after that meeting as the context closes, are then every rank's final counts, drawn or not.
    """

    def __init__(self, group, totals: Sequence[int], label: str, enabled: bool | None = None, console: Console | None = None):
        store = None if group is None or group.world == 1 else group.store
        if store is None:  # alone, or in a group whose store is unknown (joined elsewhere): this rank's count only
            totals = [totals[0 if group is None else group.rank]]
        self.world, self.rank = (1, 0) if store is None else (group.world, group.rank)
        self.leader = group is None or group.leader
        self.totals = list(totals)
        self.counts = [0] * self.world
        self.label = label
        # keys of this job only: every rank opens its jobs in the same order, so they agree on the number
        self._store, self._prefix = store, (f"progress/{group.next_job()}/" if store is not None else "")
        self._published = 0.0
        self._finished = False
        self.draw = self.leader and (sys.stderr.isatty() if enabled is None else enabled)
        self._bar = None
        if self.draw:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[ranks]}"), console=console or Console(stderr=True))
        self._stop = threading.Event()
        self._poller = None

    def __enter__(self) -> JobProgress:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=sum(self.totals), rate="", ranks=self._ranks())
            if self._store is not None:
                self._poller = threading.Thread(target=self._poll, name="aml-progress", daemon=True)
                self._poller.start()
        return self

    def advance(self, n: int) -> None:
        """This rank finished `n` more items."""
        self.counts[self.rank] += n
        if self.rank and self._store is not None and time.monotonic() - self._published >= POLL_S:
            self._publish()
        elif self._bar is not None:
            self._redraw()

    def finish(self) -> None:
        """This rank's work is done: its final count is published (ranks > 0), once (closing the context after
        finish() publishes nothing more)."""
        if self.rank and self._store is not None and not self._finished:
            self._publish()
        self._finished = True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        if exc[0] is None:
            self.finish()
            if self.rank == 0 and self._store is not None:
                self._read()  # after the job's final meeting: every rank has published its final count
        if self._bar is not None:
            if exc[0] is None:
                self._redraw()
            self._bar.stop()

    # A store that fails (its host, torchrun's agent, is gone: the job is ending) stops the counts, never the work.

    def _publish(self) -> None:
        try:
            self._store.set(f"{self._prefix}{self.rank}", str(self.counts[self.rank]))
        except RuntimeError:  # torch.distributed's store errors
            self._store = None
        self._published = time.monotonic()

    def _read(self) -> None:
        store = self._store
        try:
            for r in range(1, self.world):
                key = f"{self._prefix}{r}"
                if store is not None and store.check([key]):  # never blocks on a rank that has published nothing yet
                    self.counts[r] = int(store.get(key))
        except RuntimeError:
            self._store = None

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            self._read()
            self._redraw()

    def _ranks(self) -> str:
        return "" if self.world == 1 else "ranks " + " ".join(f"{c}/{t}" for c, t in zip(self.counts, self.totals))

    def _redraw(self) -> None:
        done = sum(self.counts)
        elapsed = self._bar.tasks[self._task].elapsed or 0.0
        self._bar.update(self._task, completed=done, ranks=self._ranks(),
                         rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 and done else "")
