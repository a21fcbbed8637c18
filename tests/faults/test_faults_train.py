"""kill -9 during `engine train`, then the same command again: the run resumes and ends bit-identical
to an uninterrupted one (the same tensors in last.safetensors and best.safetensors, the same metadata
and log except the timing fields)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from engine.models import read_checkpoint_config

pytestmark = pytest.mark.faults

SIDE = 48
TIMING = {"images_per_s"}  # the only fields that may differ between two runs of the same training


@pytest.fixture(scope="module")
def stores(tiny_train, tiny_bench, tmp_path_factory):
    """Teacher stores of the training images and of the validation gallery."""
    from engine.cli import main

    root, argv = tmp_path_factory.mktemp("faults_train"), sys.argv
    for source, out in (("--train-set", tiny_train / "train" / "db.pkl"), ("--gnd", tiny_bench / "gnd.pkl")):
        sys.argv = ["engine", "encode", "--model", "effnet-lite2-gem", source, str(out), "--out",
                    str(root / f"{out.stem}.store"), "--max-side", str(SIDE), "--workers", "0"]
        try:
            main()
        except SystemExit as e:
            assert not e.code
        finally:
            sys.argv = argv
    return root / "db.store", root / "gnd.store"


def command(tiny_train, tiny_bench, stores, out):
    engine = shutil.which("engine", path=os.path.dirname(sys.executable))
    train_store, val_store = stores
    # A tuple loss with hard negatives: mining depends on the weights, so a resume that restored
    # anything wrongly (weights, optimiser, schedule, RNG) would change every later epoch.
    return [engine, "train", "--out", str(out), "--teacher-store", str(train_store), "--train-set",
            str(tiny_train / "train" / "db.pkl"), "--max-side", str(SIDE), "--workers", "0", "--loss", "contrastive",
            "--epochs", "3", "--lr", "1e-3", "--batch-size", "2", "--neg-num", "2", "--query-size", "6",
            "--pool-size", "16", "--val-gnd", str(tiny_bench / "gnd.pkl"), "--val-store", str(val_store)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float summation order in every run


def run_to_end(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]


def kill_when(cmd, ready, delay=0.0):
    """Start cmd, SIGKILL it `delay` seconds after ready() first holds (polled every 5 ms).
    Returns True if it was killed, False if it ended first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        while proc.poll() is None and not ready():
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        return True
    finally:
        proc.wait(timeout=60)


def inode(path: Path):
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def new_versions(path: Path, count: int):
    """ready() for kill_when: true once `path` has been replaced `count` times from now."""
    seen = [inode(path)]

    def ready():
        now = inode(path)
        if now is not None and now != seen[-1]:
            seen.append(now)
        return len(seen) > count

    return ready


def checkpoint(path: Path):
    """(tensors, metadata less the timing fields) of a checkpoint."""
    meta = read_checkpoint_config(path)
    meta["metrics"] = {k: v for k, v in meta["metrics"].items() if k not in TIMING}
    return load_file(str(path)), meta


def log(path: Path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def test_killed_training_resumes_bit_identical(tiny_train, tiny_bench, stores, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted run goes alongside the interrupted ones (one thread each).
    uninterrupted = subprocess.Popen(command(tiny_train, tiny_bench, stores, whole), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=ENV)
    cmd = command(tiny_train, tiny_bench, stores, killed)
    # 1: just after epoch 1's last.safetensors is written, in the window before its state is committed.
    assert kill_when(cmd, new_versions(killed / "last.safetensors", 1))
    # 2: at a seeded random point after epoch 2's state is committed: somewhere inside epoch 3.
    state = killed / "last.state.pt"
    committed = 1 if state.exists() else 0  # kill 1 may have landed just after epoch 1's commit
    assert kill_when(cmd, new_versions(state, 2 - committed), delay=random.Random(11).uniform(0.0, 0.3))
    run_to_end(cmd)
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err[-2000:]

    for name in ("last.safetensors", "best.safetensors"):
        (want, want_meta), (got, got_meta) = checkpoint(whole / name), checkpoint(killed / name)
        assert want.keys() == got.keys()
        assert all((want[k] == got[k]).all() for k in want), name
        assert got_meta == want_meta, name
    assert log(killed / "log.jsonl") == log(whole / "log.jsonl")
    assert [r["epoch"] for r in log(killed / "log.jsonl")] == [1, 2, 3]
    assert not list(killed.glob("*.tmp"))  # no temporary file left behind by the killed writers


class Killed(Exception):
    """Stands for a kill at one exact point of the run."""


def test_a_crash_after_the_checkpoint_and_before_the_commit_redoes_that_epoch(tiny_train, stores, tmp_path, monkeypatch):
    import torch

    from engine.store import open_store
    from training.data import load_train_data
    from training.trainer import TrainConfig, Trainer

    def fit(out):
        cfg = TrainConfig(loss="regression", epochs=3, lr=1e-3, batch_size=2, images_per_epoch=16, max_side=SIDE,
                          workers=0, freeze="trunk")
        Trainer(cfg, load_train_data(tiny_train / "train" / "db.pkl", open_store(stores[0])), out, progress=False).fit()

    fit(tmp_path / "whole")
    save, calls = torch.save, []

    def save_until_epoch_2(obj, f, *args, **kwargs):  # the state of epoch 2 is never committed
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_epoch_2)
    with pytest.raises(Killed):
        fit(tmp_path / "cut")
    assert checkpoint(tmp_path / "cut" / "last.safetensors")[1]["epoch"] == 2  # written, but not committed
    assert [r["epoch"] for r in log(tmp_path / "cut" / "log.jsonl")] == [1, 2]
    monkeypatch.setattr(torch, "save", save)
    fit(tmp_path / "cut")
    want, got = checkpoint(tmp_path / "whole" / "last.safetensors"), checkpoint(tmp_path / "cut" / "last.safetensors")
    assert want[1] == got[1] and all(torch.equal(want[0][k], got[0][k]) for k in want[0])
    assert log(tmp_path / "cut" / "log.jsonl") == log(tmp_path / "whole" / "log.jsonl")
    assert not list((tmp_path / "cut").glob("*.tmp"))
