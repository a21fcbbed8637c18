"""The processes of one job launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK): who this one is, and the
two things they share: a small object rank 0 sends to all (`broadcast`) and a meeting point (`barrier`).

Only small objects cross (a plan, an error), so the group always talks over gloo, on CPU and on CUDA alike;
the data each rank makes goes to files. A lone process (no torchrun) is a group of one that needs no
torch.distributed at all.
"""
from __future__ import annotations

import os
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
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self._owned:
            dist.destroy_process_group()
            self._owned = False


def rank_device(device: str, group: Group) -> str:
    """One device per rank on a node: a bare "cuda" becomes "cuda:LOCAL_RANK" when several processes run."""
    if device == "cuda" and group.world > 1 and torch.cuda.is_available():
        return f"cuda:{group.local_rank % torch.cuda.device_count()}"
    return device
