"""`kill -9` at seeded points of `engine encode` and `engine store convert`, then rerun: bit-identical to an uninterrupted run.

Each point is a number of shard files on disk (polled), so a kill lands before the first shard, between a
shard's file and its manifest entry, or mid-way through a copy; every rerun resumes from what the last one left.
"""
import random
import shutil

import numpy as np
import pytest
from storefaults import N_IMAGES, SHARD_ROWS, assert_same_store, baseline, encode_args, engine, kill_when, photos, shard_files, start

from engine.store import add_copy, open_store, write_store

__all__ = ["baseline", "photos"]  # fixtures

pytestmark = pytest.mark.faults


def test_encode_killed_three_times_then_resumed_is_bit_identical(photos, baseline, tmp_path):
    out = tmp_path / "s"
    n_shards = N_IMAGES // SHARD_ROWS
    points = sorted(random.Random(11).sample(range(n_shards), 3))  # shard files on disk when the kill lands
    killed = 0
    for point in points:
        proc = start(*encode_args(photos, out))
        killed += kill_when(proc, lambda: (out / "manifest.json").exists() and shard_files(out) >= point)
        if (out / "manifest.json").exists():
            open_store(out, allow_incomplete=True)  # what a kill leaves is whole: a valid manifest over whole shards
    assert killed >= 2  # the points were reached before the encode ended
    done = engine(*encode_args(photos, out))
    assert done.returncode == 0, done.stderr
    assert_same_store(out, baseline)


def test_convert_killed_three_times_then_resumed_is_bit_identical(tmp_path):
    v = np.random.default_rng(3).standard_normal((600, 32)).astype(np.float32)
    write_store(tmp_path / "want", v, "space-a", shard_rows=10)  # 60 shards: 120 int8 files
    shutil.copytree(tmp_path / "want", tmp_path / "got")
    add_copy(tmp_path / "want", "int8")
    got = tmp_path / "got"
    killed = 0
    for point in sorted(random.Random(12).sample(range(1, 120), 3)):
        proc = start("store", "convert", got, "--dtype", "int8")
        killed += kill_when(proc, lambda: shard_files(got, "int8") >= point)
        open_store(got, checksums=True)  # the store stays whole meanwhile
    assert killed >= 2
    done = engine("store", "convert", got, "--dtype", "int8")
    assert done.returncode == 0, done.stderr
    assert_same_store(got, tmp_path / "want")
