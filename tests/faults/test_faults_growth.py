"""Growing and shrinking under faults: `kill -9` during `store add` and `store compact`, then rerun: bit-identical to
an uninterrupted run, the store whole (its last published generation) after every kill; a second writer refused.

Each kill lands when a number of the change's new shard files (new inodes) are on disk: before the first,
between shards, or with every shard written but the manifest not yet published.
"""
import json
import os
import shutil

import numpy as np
import pytest
from storefaults import assert_same_store, baseline, encode_args, engine, kill_when, photos, start

from engine.gallery import Change, remove_names
from engine.store import add_copy, open_store, write_store

__all__ = ["baseline", "photos"]  # fixtures

pytestmark = pytest.mark.faults

ADD_ARGS = ["--workers", "0", "--batch-size", "1", "--runner", "torch"]  # as storefaults.encode_args runs


def new_files(store, before: set[int], n: int, sub: str = "float32"):
    """A condition: at least `n` whole .npy files in `sub` whose inodes were not among `before`."""
    return lambda: sum(1 for e in os.scandir(store / sub) if e.name.endswith(".npy") and e.inode() not in before) >= n


def inodes(store, sub="float32") -> set[int]:
    return {e.inode() for e in os.scandir(store / sub)}


@pytest.fixture(scope="module")
def halves(photos, tmp_path_factory):
    """The photographs split in two folders, `base` (an encode of the first half) and `want` (base + an
    uninterrupted `store add` of the second half)."""
    root = tmp_path_factory.mktemp("growth_halves")
    for sub in ("first", "rest"):
        (root / sub).mkdir()
    files = sorted(photos.iterdir())
    for i, f in enumerate(files):
        shutil.copyfile(f, root / ("first" if i < len(files) // 2 else "rest") / f.name)
    done = engine(*encode_args(root / "first", root / "base"))
    assert done.returncode == 0, done.stderr
    shutil.copytree(root / "base", root / "want")
    done = engine("store", "add", root / "want", "--images", root / "rest", *ADD_ARGS)
    assert done.returncode == 0, done.stderr
    return root


def test_add_killed_three_times_then_rerun_is_bit_identical(halves, baseline, tmp_path):
    got = tmp_path / "s"
    shutil.copytree(halves / "base", got)
    killed = 0
    for point in (1, 3):  # new float32 shard files on disk when the kill lands: between shards, all three unpublished
        ready = new_files(got, inodes(got), point)
        killed += kill_when(start("store", "add", got, "--images", halves / "rest", *ADD_ARGS), ready)
        store = open_store(got, checksums=True)  # whole, and still the generation before the add
        assert store.generation == 1 and store.count == 6
    assert killed >= 1
    done = engine("store", "add", got, "--images", halves / "rest", *ADD_ARGS)
    assert done.returncode == 0, done.stderr
    assert_same_store(got, halves / "want")
    grown, union = open_store(got), open_store(baseline)  # and it equals one encode of all the photographs
    np.testing.assert_array_equal(grown.vectors(), union.vectors())
    assert grown.names() == union.names()


def test_compact_killed_then_rerun_is_bit_identical(tmp_path):
    n = 600
    v = np.random.default_rng(4).standard_normal((n, 16)).astype(np.float32)
    write_store(tmp_path / "before", v, "space-a", [f"n{i}" for i in range(n)], shard_rows=10)
    add_copy(tmp_path / "before", "int8")
    remove_names(tmp_path / "before", [f"n{i}" for i in range(0, n, 7)])
    shutil.copytree(tmp_path / "before", tmp_path / "want")
    done = engine("store", "compact", tmp_path / "want")
    assert done.returncode == 0, done.stderr
    killed = 0
    for point in (1, 50, 100):  # new int8 files (vectors and scales; 104 in all) when the kill lands
        got = tmp_path / f"got{point}"
        shutil.copytree(tmp_path / "before", got)
        killed += kill_when(start("store", "compact", got), new_files(got, inodes(got, "int8"), point, "int8"))
        store = open_store(got, checksums=True)  # whole: the generation before, or the compacted one
        assert (store.generation, len(store.deleted_rows())) in ((3, 86), (4, 0))
        done = engine("store", "compact", got)
        assert done.returncode == 0, done.stderr
        assert_same_store(got, tmp_path / "want")
    assert killed >= 1


def test_a_second_writer_is_refused_naming_the_first(tmp_path, halves):
    got = tmp_path / "s"
    shutil.copytree(halves / "base", got)
    (tmp_path / "names.txt").write_text("im00.jpg\n")
    before = (got / "manifest.json").read_bytes()
    with Change(got):  # a writer holding the store (as `store add` does while it encodes)
        for args in (("store", "add", got, "--images", halves / "rest", *ADD_ARGS), ("store", "remove", got, "--names", tmp_path / "names.txt"),
                     ("store", "compact", got)):
            done = engine(*args)
            assert done.returncode == 1, (args, done.stderr)
            assert done.stderr.count("\n") == 1 and f"being written by pid {os.getpid()}" in done.stderr, done.stderr
    assert (got / "manifest.json").read_bytes() == before
    assert json.loads(before)["generation"] == 1
