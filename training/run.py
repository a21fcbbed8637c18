"""One training run from files: process group (under torchrun), data, validation set, trainer."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import EngineError
from engine.store import open_store

from .data import load_train_data
from .trainer import TrainConfig, Trainer
from .validate import load_val_set


def init_distributed() -> bool:
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on GPU); False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def run_training(cfg: TrainConfig, out_dir: Path, teacher_store: Path, train_set: Path, images: Path | None = None,
                 val_gnd: Path | None = None, val_store: Path | None = None, init: Path | None = None,
                 progress: bool | None = None) -> dict:
    """Train and return the last epoch's metrics (loss, images/s, validation mAPs).

    The configuration is checked before any work: a bad value is one EngineError.
    """
    cfg.check()
    if (val_gnd is None) != (val_store is None):
        given, missing = ("--val-gnd", "--val-store") if val_store is None else ("--val-store", "--val-gnd")
        raise EngineError(f"{given} needs {missing}: validation reads the ground truth and the teacher store of its "
                          f"gallery", val_gnd or val_store)
    started = init_distributed()
    try:
        data = load_train_data(train_set, open_store(teacher_store), images)
        val = load_val_set(val_gnd, val_store) if val_gnd is not None else None
        return Trainer(cfg, data, out_dir, val, progress=progress, init=init).fit()
    finally:
        if started:
            dist.destroy_process_group()
