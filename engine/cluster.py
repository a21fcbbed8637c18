"""Shard groups on a Ray cluster: one store's gallery held by several machines, searched as one.

The store's shards are split into G shard groups, shard i going to group i % G: a store that grows appends
shards, and modulo spreads them over the groups without moving any existing shard to another group (contiguous
ranges would pile new rows onto the last group and move shards on every split). Each group is held by R Ray
actors (`GroupHolder`), placed through one placement group per shard group with strategy SPREAD, so a group's
replicas land on different nodes wherever the cluster has several. Every actor opens its shards once, keeps
them mapped, and scans them with the engine's own kernel; ids stay the store's global row numbers.

`ShardGroups` is the front end, with engine.Index's search contract: it checks a query block at the edge,
sends it to one replica of every group (round-robin), and merges the groups' top-k lists exactly (best_k:
score descending, ties by lower global id), so its results are `engine.search`'s. An actor that dies mid-query
(RayActorError, ActorDiedError, ActorUnavailableError) costs nothing but time: the group's part of the query
goes to the group's next replica, and Ray restarts the dead actor (max_restarts=-1). Every part carries the
store generation its actor holds; parts of different generations are never merged (the front end refreshes
every actor and asks again), so a gallery that changes while it is served is answered old or new, never mixed.

The store path must name the same store on every node (a shared filesystem, or one copy at one path per node).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .checks import check_int
from .errors import EngineError
from .index import Index
from .search import best_k, check_queries, check_result_size, check_threads, plan_scan
from .store import Store, open_store

RETRY_S = 60.0  # how long a group's query waits for any replica to be alive again before it is refused
PLACEMENT_S = 60.0  # how long the actors may wait for the cluster's CPUs before the start is refused
GENERATION_TRIES = 3  # whole-query retries when parts came from different store generations


def group_shards(n_shards: int, group: int, groups: int) -> list[int]:
    """The shard numbers (of n_shards) that group `group` of `groups` holds: group, group + G, group + 2G, ..."""
    return list(range(group, n_shards, groups))


class GroupHolder:
    """One replica of one shard group: the group's shards of the store at `path`, opened once and kept resident.

    Plain Python (a Ray actor through `ray.remote(GroupHolder)`); `threads` is the kernel's scan threads.
    """

    def __init__(self, path: str, group: int, groups: int, threads: int = 1):
        self.path, self.group, self.groups, self.threads = Path(path), group, groups, threads
        self._open()

    def _open(self) -> None:
        store = open_store(self.path)
        shards = group_shards(len(store.manifest["shards"]), self.group, self.groups)
        self.index = Index([store], shards=shards)  # resident; ids stay the store's row numbers
        self.generation = store.generation
        self.rows = sum(store.manifest["shards"][i]["rows"] for i in shards)

    def describe(self) -> dict:
        """Where this replica runs and what it holds: node id, process id, generation, rows."""
        return {"node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "", "pid": os.getpid(),
                "generation": self.generation, "rows": self.rows}

    def search(self, queries: np.ndarray, k: int, scan: str, rescore: int, isa: str):
        """(scores float32 Q x k', ids int64 Q x k' global, generation) over this group's shards."""
        scores, ids = self.index.search(queries, k, scan=scan, rescore=rescore, threads=self.threads, isa=isa)
        return scores, ids, self.generation

    def refresh(self) -> int:
        """Reopen the store if it published a newer generation; returns the generation now held."""
        if open_store(self.path).generation != self.generation:
            self._open()
        return self.generation


def _cause(e: RayTaskError) -> Exception:
    """What an actor's method raised (an EngineError stays the one user-facing error; anything else is a bug)."""
    return e.cause if isinstance(getattr(e, "cause", None), Exception) else e


class ShardGroups:
    """A store served by G shard groups x R replica actors on a Ray cluster; searched like engine.Index.

    store: the store's path (the same on every node). address: "local" starts Ray on this machine, anything
    else is a running cluster's address ("HOST:6379" or "auto"); when Ray is already initialised in this
    process it is used as it is (and left running by close()). groups, replicas: G and R. cpus: the CPUs each
    actor reserves on its node (Ray's logical resource; may be fractional); threads: the scan threads each
    actor's kernel uses (0 = all its node's cores). retry_s: how long a group's query waits for a live
    replica before it is refused.
    """

    def __init__(self, store: str | Path, address: str = "local", groups: int = 2, replicas: int = 2,
                 cpus: float = 1.0, threads: int = 1, retry_s: float = RETRY_S):
        check_int(groups, "groups", minimum=1)
        check_int(replicas, "replicas", minimum=1)
        check_threads(threads, "engine")
        if not cpus > 0:
            raise EngineError(f"cpus per actor must be > 0, got {cpus}")
        self.path = Path(store)
        self._store = open_store(self.path)  # checked here, before any actor starts
        self.groups, self.replicas, self.retry_s = groups, replicas, retry_s
        self._names: list[str] | None = None
        self.failovers = 0  # group parts asked again of another replica after an actor failed
        self._lock = threading.Lock()
        self._turns = [itertools.count() for _ in range(groups)]
        self._started_ray = False
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            self._started_ray = True
        self._placements, self.actors = [], []
        try:
            self._start(cpus, threads)
        except BaseException:
            self.close()
            raise

    def _start(self, cpus: float, threads: int) -> None:
        remote = ray.remote(max_restarts=-1, max_task_retries=0)(GroupHolder)
        for g in range(self.groups):
            pg = placement_group([{"CPU": cpus}] * self.replicas, strategy="SPREAD")
            self._placements.append(pg)
            try:
                ray.get(pg.ready(), timeout=PLACEMENT_S)
            except GetTimeoutError:
                total = ray.cluster_resources().get("CPU", 0)
                raise EngineError(f"the cluster cannot place {self.groups} x {self.replicas} actors of {cpus} CPU "
                                  f"each within {PLACEMENT_S:.0f} s (it has {total:g} CPUs): lower --cpus, "
                                  f"--groups or --replicas") from None
            self.actors.append([
                remote.options(num_cpus=cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, r)).remote(
                    str(self.path.resolve()), g, self.groups, threads)
                for r in range(self.replicas)])
        try:
            self.placement = [ray.get([a.describe.remote() for a in row]) for row in self.actors]
        except RayActorError as e:  # an actor could not open its shards (the store missing on its node?)
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise EngineError(f"a shard group's actor could not start: {last.split(': ', 1)[-1]}", self.path) from None

    # ------------------------------------------------------------------ the gallery, as engine.Index
    @property
    def store(self) -> Store:
        return self._store

    stores: list[Store] = property(lambda self: [self._store])  # as engine.Index: the service reads stores[0]

    count: int = property(lambda self: self._store.count)
    dim: int = property(lambda self: self._store.dim)
    space: str = property(lambda self: self._store.space)
    generation: tuple[int, ...] = property(lambda self: (self._store.generation,))

    def names(self, ids: np.ndarray) -> list[list[str]]:
        """The image name of each global id (Q x k' -> lists)."""
        with self._lock:
            if self._names is None:
                self._names = self._store.names()
            names = self._names
        return [[names[i] for i in row] for row in np.asarray(ids).tolist()]

    def refresh(self) -> bool:
        """Move the front end and every actor to the store's newest generation; True if the gallery changed."""
        with self._lock:
            fresh = open_store(self.path)
            changed = fresh.generation != self._store.generation
            self._store, self._names = fresh, None if changed else self._names
        refs = [a.refresh.remote() for row in self.actors for a in row]
        for ref in refs:
            try:
                ray.get(ref)
            except RayActorError:  # a restarting actor opens the newest generation anyway
                pass
            except RayTaskError as e:
                raise _cause(e) from None
        return changed

    def search(self, queries: np.ndarray, k: int, space: str | None = None, scan: str | None = None,
               rescore: int | None = None, isa: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 Q x k', ids int64 Q x k'), exactly `engine.search(store, queries, k, ...)`'s.

        queries: Q x D (or one D vector); space, scan, rescore, isa: as engine.search (every actor scans with
        the engine backend and its own `threads`). Checked here before any actor is asked.
        """
        for _ in range(GENERATION_TRIES):
            store = self._store
            q = check_queries(store, queries, k, space)
            scan_, rescore_ = plan_scan(store, scan, rescore)
            width = check_result_size(len(q), int(k), store.count)
            parts = self._scan_groups(q, width, scan_, rescore_, isa)
            if all(gen == store.generation for _, _, gen in parts):
                return best_k(np.concatenate([s for s, _, _ in parts], axis=1),
                              np.concatenate([i for _, i, _ in parts], axis=1), width)
            self.refresh()  # parts of another generation than the front end's: never merged
        raise EngineError(f"the store kept changing while it was searched ({GENERATION_TRIES} tries)", self.path)

    def _scan_groups(self, q: np.ndarray, k: int, scan: str, rescore: int, isa: str) -> list:
        """Every group's (scores, ids, generation): one replica each, round-robin; a dead replica's part is asked
        of the group's next one, round and round until one answers or retry_s has passed."""
        arg = ray.put(q) if q.nbytes > 100_000 else q  # one copy of a large block for every group
        first = [next(turn) for turn in self._turns]
        refs = [self.actors[g][first[g] % self.replicas].search.remote(arg, k, scan, rescore, isa)
                for g in range(self.groups)]
        parts = []
        for g, ref in enumerate(refs):
            deadline, tries = time.monotonic() + self.retry_s, 0
            while True:
                try:
                    parts.append(ray.get(ref))
                    break
                except RayActorError:
                    tries += 1
                    self.failovers += 1
                    if time.monotonic() > deadline:
                        raise EngineError(f"shard group {g}: no replica answered within {self.retry_s:.0f} s") from None
                    if tries % self.replicas == 0:  # every replica failed once: give Ray time to restart one
                        time.sleep(min(0.05 * tries, 1.0))
                    replica = self.actors[g][(first[g] + tries) % self.replicas]
                    ref = replica.search.remote(arg, k, scan, rescore, isa)
                except RayTaskError as e:
                    raise _cause(e) from None
        return parts

    def close(self) -> None:
        """Stop the actors and free their placement; shut Ray down if this object started it."""
        for row in getattr(self, "actors", []):
            for actor in row:
                ray.kill(actor, no_restart=True)
        for pg in getattr(self, "_placements", []):
            remove_placement_group(pg)
        self.actors, self._placements = [], []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> ShardGroups:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
