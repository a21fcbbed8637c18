"""`torchrun --nproc-per-node 2` (gloo, CPU) trains the same way as one process."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_training import SIDE, teacher_store  # noqa: F401  (the module fixture)


def train(tiny_train, teacher_store, out, nproc):
    engine = shutil.which("engine", path=os.path.dirname(sys.executable))
    args = ["train", "--out", str(out), "--teacher-store", str(teacher_store), "--train-set",
            str(tiny_train / "train" / "db.pkl"), "--max-side", str(SIDE), "--workers", "0", "--neg-num", "2",
            "--batch-size", "4", "--loss", "contrastive", "--epochs", "3", "--lr", "1e-3", "--query-size", "8",
            "--negatives", "random"]
    if nproc == 1:
        cmd = [engine, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", engine, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_curve(tiny_train, teacher_store, tmp_path):  # noqa: F811
    single = train(tiny_train, teacher_store, tmp_path / "one", 1)
    double = train(tiny_train, teacher_store, tmp_path / "two", 2)
    assert len(single) == len(double) == 3
    for a, b in zip(single, double):
        assert b == pytest.approx(a, rel=0.05)
