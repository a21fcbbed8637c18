"""`engine encode --nproc 2` / `torchrun --nproc-per-node 2 engine encode` (gloo, CPU) writes the store (or a
student's Q.npy) one process writes, byte for byte; a job that lost a rank (an error, kill -9 of the whole job)
resumes from the shards it finished; a signal to the launcher stops every rank; rank 0's one bar counts every
rank's items."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ENGINE = shutil.which("engine", path=os.path.dirname(sys.executable))
N = 10  # images; 2 per shard: 5 shards, rank 1 of 2 gets shards 1 and 3


def save_images(folder: Path) -> None:
    from skimage import data

    folder.mkdir()
    photos = [data.astronaut(), data.coffee(), data.chelsea()]
    for i in range(N):
        img = Image.fromarray(np.roll(photos[i % 3], 30 * i, axis=1))
        img.thumbnail((64, 64))
        img.save(folder / f"im{i:02d}.png")


def args(imgs: Path, out: Path) -> list[str]:
    return ["encode", "--model", "effnet-lite2-gem", "--images", str(imgs), "--out", str(out), "--runner", "torch",
            "--workers", "0", "--max-side", "64", "--shard-rows", "2", "--batch-size", "2"]


def launch(imgs: Path, out: Path, nproc: int, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", ENGINE, *args(imgs, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def encode(imgs: Path, out: Path, nproc: int) -> subprocess.CompletedProcess:
    job = launch(imgs, out, nproc)
    stdout, stderr = job.communicate(timeout=300)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


def contents(store: Path) -> dict[str, bytes]:
    """Every file of a store but its lock, by relative path (the manifest too: ids, names, shas, generation)."""
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file() and f.name != ".lock"}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """(image folder, the store one process encodes from it)."""
    root = tmp_path_factory.mktemp("dist")
    save_images(root / "imgs")
    one = subprocess.run([ENGINE, *args(root / "imgs", root / "one")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-2000:]
    return root / "imgs", root / "one"


def test_a_failed_rank_is_resumed_by_two_processes(gallery, tmp_path):
    imgs, one = gallery
    work = tmp_path / "imgs"
    shutil.copytree(imgs, work, copy_function=shutil.copy2)  # mtimes kept: the shards' fingerprints are the reference's
    good = (work / "im06.png").read_bytes()
    (work / "im06.png").write_bytes(b"not a png")  # rank 1's second shard
    failed = encode(work, tmp_path / "two", 2)
    assert failed.returncode != 0 and "im06.png" in failed.stderr
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert not manifest["complete"]
    # rank 1's first shard was kept: committed, or still in parts/ if the job ended before its turn came
    assert len(manifest["shards"]) >= 2 or (tmp_path / "two" / "parts" / "shard-00001.json").exists()

    (work / "im06.png").write_bytes(good)
    os.utime(work / "im06.png", ns=(os.stat(imgs / "im06.png").st_atime_ns, os.stat(imgs / "im06.png").st_mtime_ns))
    done = encode(work, tmp_path / "two", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = {k: v for k, v in contents(one).items() if k != "manifest.json"}
    assert {k: v for k, v in contents(tmp_path / "two").items() if k != "manifest.json"} == ref
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (one, tmp_path / "two"))
    assert a.pop("source_key") != b.pop("source_key")  # another folder: the only difference
    for m in (a, b):
        for shard in m["shards"]:
            shard.pop("sources")
    assert a == b


def state(out: Path) -> tuple[int, list[str]]:
    """(shards committed, parts waiting) of a store being written by a job."""
    try:
        shards = len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):
        shards = 0
    return shards, sorted(p.name for p in (out / "parts").glob("*.json"))


# A job over a list whose im06 is a pipe, at the point where it hangs: rank 0 has written its last shard (4) and
# committed (and deleted the parts of) every shard before rank 1's, which hangs reading the pipe (shard 3).
STUCK = (3, ["shard-00004.json"])


def stuck_job(imgs: Path, work: Path) -> Path:
    """A copy of the images whose im06 is a pipe, and the list naming them (a folder's listing skips a pipe)."""
    shutil.copytree(imgs, work, copy_function=shutil.copy2)
    (work / "im06.png").unlink()
    os.mkfifo(work / "im06.png")
    listing = work / "list.txt"
    listing.write_text("".join(f"im{i:02d}.png\n" for i in range(N)))
    return listing


def wait_until_stuck(job: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while state(out) != STUCK and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_killed_job_is_resumed_by_one_process_that_encodes_only_the_missing_shards(gallery, tmp_path, run_cli, monkeypatch):
    imgs, one = gallery
    work, out = tmp_path / "imgs", tmp_path / "two"
    listing = stuck_job(imgs, work)
    job = launch(listing, out, 2, start_new_session=True)

    wait_until_stuck(job, out)
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both ranks: kill -9 of the whole job
    job.communicate()
    assert state(out) == STUCK and not json.loads((out / "manifest.json").read_text())["complete"]

    (work / "im06.png").unlink()
    shutil.copy2(imgs / "im06.png", work / "im06.png")
    import engine.encode

    decoded = []
    real = engine.encode.read_image
    monkeypatch.setattr(engine.encode, "read_image", lambda path, *a: decoded.append(path.name) or real(path, *a))
    code, _, err = run_cli(*args(listing, out))
    assert code == 0, err
    assert sorted(decoded) == ["im06.png", "im07.png"]  # shard 3's images, only
    assert not (out / "parts").exists()
    ref = {k: v for k, v in contents(one).items() if k != "manifest.json"}
    assert {k: v for k, v in contents(out).items() if k != "manifest.json"} == ref


def nproc(imgs: Path, out: Path, n: int) -> subprocess.CompletedProcess:
    """`engine encode --nproc n`: torch's launcher, as torchrun --standalone."""
    return subprocess.run([ENGINE, *args(imgs, out), "--nproc", str(n)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_write_the_single_process_store(gallery, tmp_path):
    imgs, one = gallery
    done = nproc(imgs, tmp_path / "two", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count(" shard(s) ") == 1  # rank 0 reports, once
    assert not (tmp_path / "two" / "parts").exists()
    assert contents(tmp_path / "two") == contents(one)


def test_a_second_writer_is_refused_on_every_rank(gallery, tmp_path):
    from engine.lock import WriteLock

    imgs, _ = gallery
    out = tmp_path / "s"
    out.mkdir()
    held = WriteLock(out)  # another writer at work on this store
    try:
        done = nproc(imgs, out, 2)
    finally:
        held.release()
    assert done.returncode == 1  # the ranks' input error, not the launcher's
    lines = done.stderr.strip().splitlines()  # rank 0 was refused, and told rank 1: one line each
    assert len(lines) == 2 and all(line.startswith("error: ") and "one writer at a time" in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written: no manifest, no parts


def test_two_processes_write_the_single_process_student_queries(gallery, tmp_path):
    imgs, one = gallery
    query = ["--student", "mobilenetv2", "--target", str(one), "--images", str(imgs), "--runner", "torch",
             "--workers", "0", "--max-side", "64", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, more in (("one.npy", []), ("two.npy", ["--nproc", "2"])):
        done = subprocess.run([ENGINE, "encode", *query, "--out", str(tmp_path / out), *more], capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "two.npy").read_bytes() == (tmp_path / "one.npy").read_bytes()
    assert (tmp_path / "two.npy.json").read_bytes() == (tmp_path / "one.npy.json").read_bytes()
    meta = json.loads((tmp_path / "two.npy.json").read_text())
    assert len(meta["names"]) == N and meta["encoder"]["role"] == "student"


# Two jobs in one torchrun run: the first draws its bar (to a file: not a terminal), the second is left to decide
# (stderr is a pipe: quiet). Rank 1 has more items than rank 0 and finishes last.
PROGRESS_JOB = """
import io, json, sys
from rich.console import Console
from engine.distributed import Group
from engine.progress import JobProgress

group = Group()
out = io.StringIO()
for totals, enabled, console in (([3, 7], True, Console(file=out, width=200)), ([5, 2], None, None)):
    with JobProgress(group, totals, "job", enabled, console) as bar:
        for _ in range(totals[group.rank]):
            bar.advance(1)
        bar.finish()
        group.barrier()
    if group.leader:
        print(json.dumps({"counts": bar.counts, "drawn": out.getvalue()}))
group.close()
"""


def test_one_bar_counts_every_rank_and_is_quiet_off_a_terminal(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PROGRESS_JOB)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    drawn, quiet = (json.loads(line) for line in done.stdout.splitlines())
    assert drawn["counts"] == [3, 7] and quiet["counts"] == [5, 2]
    line = drawn["drawn"]  # off a terminal, rich draws the final state once
    assert line.count("\n") == 1 and " 10/10 " in line and line.rstrip().endswith("ranks 3/3 7/7")
    assert quiet["drawn"] == line and "job" not in done.stderr  # the quiet job drew nothing, anywhere


def test_a_bar_without_the_job_store_counts_its_own_share():
    """Alone, or in a group joined elsewhere (no store to read): the bar is this rank's items, never a total it cannot reach."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from engine.progress import JobProgress

    for group, totals in ((None, [4]), (SimpleNamespace(world=2, rank=0, leader=True, store=None), [4, 9])):
        out = io.StringIO()
        with JobProgress(group, totals, "job", True, Console(file=out, width=200)) as bar:
            bar.advance(3)
            bar.advance(1)
            bar.finish()
        assert bar.counts == [4] and " 4/4 " in out.getvalue() and "ranks" not in out.getvalue()


def test_nproc_under_torchrun_is_refused(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--images", tmp_path, "--out", tmp_path / "s", "--nproc", "2")
    assert code == 1 and err.count("\n") == 1 and "--nproc-per-node" in err
    assert not (tmp_path / "s").exists()


def test_a_rank_publishes_its_final_count_once():
    """finish() before the job's final meeting publishes the count; closing the context does not publish it again."""
    from types import SimpleNamespace

    from engine.progress import JobProgress

    class Store:
        def __init__(self):
            self.sets = []

        def set(self, key, value):
            self.sets.append((key, value))

    for finish in (True, False):  # a caller that never calls finish() still has its count published on close
        store = Store()
        group = SimpleNamespace(world=2, rank=1, leader=False, store=store, next_job=lambda: 1)
        with JobProgress(group, [2, 2], "job", False) as bar:
            bar.advance(2)
            store.sets.clear()  # what advance() published on the way
            if finish:
                bar.finish()
        assert store.sets == [("progress/1/1", "2")]


def test_a_failing_store_stops_the_counts_not_the_work():
    """torchrun's agent (the store's host) gone: publishing and reading counts give up quietly; the ranks work on."""
    from types import SimpleNamespace

    from engine.progress import JobProgress

    class GoneStore:
        calls = 0

        def set(self, *a):
            GoneStore.calls += 1
            raise RuntimeError("connection reset")  # what torch.distributed.DistNetworkError is

        check = get = set

    for rank in (1, 0):
        group = SimpleNamespace(world=2, rank=rank, leader=rank == 0, store=GoneStore(), next_job=lambda: 1)
        with JobProgress(group, [2, 2], "job", False) as bar:
            bar.advance(1)
            bar.advance(1)
            bar.finish()
        assert bar.counts[rank] == 2
    assert GoneStore.calls == 2  # once by each rank; then the store is left alone


def test_a_signal_to_nproc_stops_every_rank(gallery, tmp_path):
    from engine.lock import WriteLock

    imgs, _ = gallery
    work, out = tmp_path / "imgs", tmp_path / "two"
    listing = stuck_job(imgs, work)
    job = subprocess.Popen([ENGINE, *args(listing, out), "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_stuck(job, out)
        assert state(out) == STUCK
        job.send_signal(signal.SIGTERM)  # to the launcher alone
        job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 128 + signal.SIGTERM
    WriteLock(out).release()  # rank 0 is gone: nobody holds the store
    with pytest.raises(OSError):  # rank 1 is gone: nobody reads the pipe it hung on
        os.close(os.open(work / "im06.png", os.O_WRONLY | os.O_NONBLOCK))
