"""Helpers and fixtures of the store's fault tests: the `engine` command as a subprocess over tiny photographs.

Test modules import the fixtures they use; each fixture keeps its result under the session's base temp
folder, so a fixture imported into several modules is still computed once.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

N_IMAGES, SHARD_ROWS = 12, 2  # six shards
ENGINE = shutil.which("engine", path=os.path.dirname(sys.executable))
# one thread: the same arithmetic in every run (and fair to a shared 2-core machine)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def encode_args(images, out) -> list[str]:
    """The cheapest real `engine encode` into a store: pretrained teacher, 64 px, one image per batch, torch on CPU."""
    return ["encode", "--model", "effnet-lite2-gem", "--images", str(images), "--out", str(out), "--max-side", "64",
            "--shard-rows", str(SHARD_ROWS), "--workers", "0", "--batch-size", "1", "--runner", "torch"]


def engine(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run `engine ARGS` to the end; returns the completed process (text stdout/stderr)."""
    return subprocess.run([ENGINE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120, **kwargs)


def start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([ENGINE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ENV, **kwargs)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; True if it was killed, False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


def shard_files(store, sub="float32") -> int:
    folder = store / sub
    return sum(1 for f in os.listdir(folder) if f.endswith(".npy")) if folder.is_dir() else 0


def assert_same_store(got, want):
    """Bit-identical stores: the same manifest, the same files byte for byte, nothing else left behind."""
    from engine.store import open_store

    assert json.loads((got / "manifest.json").read_text()) == json.loads((want / "manifest.json").read_text())
    files = sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(want)) for p in want.rglob("*") if p.is_file())
    for rel in files:
        if rel != ".lock":
            assert (got / rel).read_bytes() == (want / rel).read_bytes(), rel
    a, b = open_store(got, checksums=True), open_store(want, checksums=True)
    np.testing.assert_array_equal(a.vectors(), b.vectors())
    assert a.names() == b.names()


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """N_IMAGES small real photographs (shifted astronaut), each its own file."""
    from skimage import data

    folder = tmp_path_factory.getbasetemp() / "store-photos"
    if folder.exists():
        return folder
    folder.mkdir()
    photo = data.astronaut()[::4, ::4]
    for i in range(N_IMAGES):
        Image.fromarray(np.roll(photo, 11 * i, axis=1)).save(folder / f"im{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def baseline(photos, tmp_path_factory):
    """The store an uninterrupted `engine encode` makes of `photos`."""
    out = tmp_path_factory.getbasetemp() / "store-baseline"
    if (out / "manifest.json").exists():
        return out
    done = engine(*encode_args(photos, out))
    assert done.returncode == 0, done.stderr
    return out
