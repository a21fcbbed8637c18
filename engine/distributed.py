"""The processes of one job launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK): who this one is, and what
they share: a small object rank 0 sends to all (`broadcast`), a meeting point (`barrier`) and the rendezvous's
key-value `store` (where engine.progress counts go, without a collective). `launch` starts such a job on this
machine, as `torchrun --standalone` would.

Only small objects cross (a plan, an error), so the group always talks over gloo, on CPU and on CUDA alike;
the data each rank makes goes to files. A lone process (no torchrun) is a group of one that needs no
torch.distributed at all.
"""
from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank that is done waits at a barrier for the slowest one, which can be hours on a large gallery; a rank
# that dies does not leave the others waiting that long: torchrun stops the whole job.
BARRIER_TIMEOUT = timedelta(days=7)


class Group:
    """This process's place in its job: `world` processes, this one is `rank` (0: the one that commits)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owned = False
        self._jobs = 0
        self.store = None  # the rendezvous's key-value store, when this object joined the group (else unknown)
        if self.world > 1 and not dist.is_initialized():
            # init_process_group's own rendezvous, done here to keep its store
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world, timeout=BARRIER_TIMEOUT))
            store.set_timeout(BARRIER_TIMEOUT)
            dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=self.rank,
                                    world_size=self.world, timeout=BARRIER_TIMEOUT)
            self.store = dist.PrefixStore("aml-engine", store)
            self._owned = True

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj=None):
        """Rank 0's `obj` (any picklable value), on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """Every rank's `obj` (picklable), as a list in rank order on rank 0; None on the other ranks."""
        if self.world == 1:
            return [obj]
        box = [None] * self.world if self.leader else None
        dist.gather_object(obj, box, dst=0)
        return box

    def next_job(self) -> int:
        """A number for the next job step that uses the store (every rank counts its steps in the same order)."""
        self._jobs += 1
        return self._jobs

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this object joined it. Outside an exception the ranks meet first: a rank's last
        send can return before its peer has received it, and tearing the connections down under it can abort the
        process (gloo's threads); after an error nobody waits (a rank that failed never comes)."""
        if self._owned:
            if sys.exc_info()[0] is None:
                dist.barrier()
            dist.destroy_process_group()
            self._owned = False


def rank_device(device: str, group: Group) -> str:
    """One device per rank on a node: a bare "cuda" becomes "cuda:LOCAL_RANK" when several processes run."""
    if device == "cuda" and group.world > 1 and torch.cuda.is_available():
        return f"cuda:{group.local_rank % torch.cuda.device_count()}"
    return device


def launch(nproc: int, program: str, args: Sequence[str]) -> int:
    """Run `program args...` as `nproc` processes on this machine under torch.distributed's elastic launcher,
    torchrun's own (the rendezvous of `torchrun --standalone`: a free port on localhost; no restarts), each with
    torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT), so `Group()` in it joins,
    and, unless OMP_NUM_THREADS is set, a share of the machine's cores each.

    Returns 0, or the exit code of the first rank that failed (128 + N for a signal N; the same when this
    process is sent a signal N, ^C too: the launcher stops the ranks); a failed rank prints its own error, and
    the launcher stops the others.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0)
    elastic = logging.getLogger("torch.distributed.elastic")
    saved = elastic.level, os.environ.get("OMP_NUM_THREADS")
    elastic.setLevel(logging.CRITICAL)  # a failed rank has said why; the agent's report of it is a traceback
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the ranks inherit it
    try:
        elastic_launch(config, program)(*args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        elastic.setLevel(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0
