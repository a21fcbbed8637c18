"""Damaged shards and a tampered manifest: `store info --verify` and `search` refuse with one line naming the file.

What a cheap open cannot see (a same-shape shard from another store, a flipped bit in the vector data)
`--verify` finds by its sha256; a search over such a store still returns only ids that exist.
"""
import json
import os
import shutil

import numpy as np
import pytest

from engine.errors import EXIT_INPUT
from engine.store import MANIFEST, write_store

pytestmark = pytest.mark.faults

N, D, ROWS = 30, 8, 10


def vectors(seed):
    v = np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 3-shard store with an int8 copy, another store of the same shape, and query vectors in its space."""
    root = tmp_path_factory.mktemp("faults_store")
    write_store(root / "s", vectors(0), "space-a", [f"a{i}" for i in range(N)], shard_rows=ROWS)
    from engine.store import add_copy

    add_copy(root / "s", "int8")
    write_store(root / "other", vectors(1), "space-a", [f"b{i}" for i in range(N)], shard_rows=ROWS)
    np.save(root / "q.npy", vectors(2)[:4])
    (root / "q.npy.json").write_text(json.dumps({"space": "space-a", "dim": D}))
    return root


@pytest.fixture
def store(pristine, tmp_path):
    shutil.copytree(pristine / "s", tmp_path / "s", symlinks=True)
    shutil.copytree(pristine / "other", tmp_path / "other")
    for f in ("q.npy", "q.npy.json"):
        shutil.copyfile(pristine / f, tmp_path / f)
    return tmp_path / "s"


def refused_by_both(run_cli, store, names, verify_only=False):
    """`store info --verify` (and, unless verify_only, `search`) exit EXIT_INPUT with one line naming `names`."""
    commands = [("store", "info", store, "--verify")]
    if not verify_only:
        commands.append(("search", store, "--queries", store.parent / "q.npy", "-k", 5, "--out", store.parent / "r.npz"))
    for args in commands:
        code, out, err = run_cli(*args)
        assert code == EXIT_INPUT, (args, code, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert "Traceback" not in err
        for name in names:
            assert name in err, (name, err)
        assert not (store.parent / "r.npz").exists()


def search_ids(run_cli, store):
    code, _, err = run_cli("search", store, "--queries", store.parent / "q.npy", "-k", 50, "--out", store.parent / "r.npz")
    assert code == 0, err
    return np.load(store.parent / "r.npz")["ids"]


# ---------------------------------------------------------------- damaged files


def test_pristine_store_passes(run_cli, store):
    code, out, err = run_cli("store", "info", store, "--verify")
    assert code == 0 and json.loads(out)["verified"], err
    assert sorted(np.unique(search_ids(run_cli, store))) == list(range(N))


@pytest.mark.parametrize("rel", ["float32/shard-00001.npy", "int8/shard-00002.npy", "int8/shard-00000.scale.npy"])
def test_truncated_shard(run_cli, store, rel):
    f = store / rel
    f.write_bytes(f.read_bytes()[:-7])
    refused_by_both(run_cli, store, [rel.split("/")[1]])


@pytest.mark.parametrize("rel", ["float32/shard-00001.npy", "int8/shard-00000.scale.npy", "names/shard-00002.parquet"])
def test_missing_file(run_cli, store, rel):
    (store / rel).unlink()
    refused_by_both(run_cli, store, [rel.split("/")[1], "missing"])


def test_bit_flipped_header(run_cli, store):
    f = store / "float32" / "shard-00001.npy"
    data = bytearray(f.read_bytes())
    data[50] ^= 0x04  # inside the header's shape/dtype text
    f.write_bytes(bytes(data))
    refused_by_both(run_cli, store, ["shard-00001.npy"])


@pytest.mark.parametrize("rel", ["float32/shard-00002.npy", "int8/shard-00001.npy", "names/shard-00000.parquet"])
def test_bit_flipped_data_is_found_by_verify_and_search_returns_only_real_ids(run_cli, store, rel):
    f = store / rel
    data = bytearray(f.read_bytes())
    data[-40] ^= 0x01
    f.write_bytes(bytes(data))
    refused_by_both(run_cli, store, [rel.split("/")[1], "checksum"], verify_only=True)
    if not rel.startswith("names"):
        ids = search_ids(run_cli, store)
        assert ids.min() >= 0 and ids.max() < N


@pytest.mark.parametrize("rel", ["float32/shard-00001.npy", "names/shard-00001.parquet"])
def test_foreign_file_of_the_same_shape(run_cli, store, rel):
    shutil.copyfile(store.parent / "other" / rel, store / rel)
    refused_by_both(run_cli, store, [rel.split("/")[1], "checksum"], verify_only=True)
    ids = search_ids(run_cli, store)
    assert ids.min() >= 0 and ids.max() < N


def test_foreign_shard_of_another_shape(run_cli, store, tmp_path):
    write_store(tmp_path / "big", np.ones((40, D), np.float32), "space-a", shard_rows=20)
    shutil.copyfile(tmp_path / "big" / "float32" / "shard-00000.npy", store / "float32" / "shard-00000.npy")
    refused_by_both(run_cli, store, ["shard-00000.npy", "manifest says"])


def test_names_file_swapped_for_one_of_another_length(run_cli, store, tmp_path):
    write_store(tmp_path / "big", np.ones((40, D), np.float32), "space-a", shard_rows=20)
    shutil.copyfile(tmp_path / "big" / "names" / "shard-00000.parquet", store / "names" / "shard-00001.parquet")
    refused_by_both(run_cli, store, ["names/shard-00001.parquet", "20 row"])


# ---------------------------------------------------------------- a tampered manifest


def _drop_shard(m, i):
    del m["shards"][i]
    for entries in m["copies"].values():
        del entries[i]


def _set(path, value):
    def change(m):
        obj = m
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return change


TAMPERING = {
    "absolute path": (_set(["copies", "float32", 1, "file"], "/etc/hostname"), "copies.float32[1].file"),
    "dot-dot path": (_set(["copies", "int8", 0, "scale"], "../other/float32/shard-00000.npy"), "copies.int8[0].scale"),
    "dot-dot names": (_set(["shards", 2, "names"], "names/../../other/names/shard-00002.parquet"), "shards[2].names"),
    "start off": (_set(["shards", 1, "start"], 11), "shards[1].start"),
    "rows off": (_set(["shards", 1, "rows"], 9), "shards[2].start"),
    "count too big": (_set(["count"], 31), "field count"),
    "count too small": (_set(["count"], 20), "field count"),
    "missing shard entry": (lambda m: _drop_shard(m, 1), "shards[1].start"),
    "missing last shard entry": (lambda m: _drop_shard(m, 2), "field count"),
    "missing copy entry": (lambda m: m["copies"]["int8"].pop(), "copies.int8"),
    "empty space": (_set(["space"], ""), "field space"),
    "space not a string": (_set(["space"], 7), "field space"),
    "dim a float": (_set(["dim"], 8.0), "field dim"),
    "dim a bool": (_set(["dim"], True), "field dim"),
    "dim a string": (_set(["dim"], "8"), "field dim"),
    "dim zero": (_set(["dim"], 0), "field dim"),
    "count a string": (_set(["count"], "30"), "field count"),
    "shard_rows zero": (_set(["shard_rows"], 0), "field shard_rows"),
    "start a float": (_set(["shards", 0, "start"], 0.0), "shards[0].start"),
    "items not following": (_set(["shards", 1, "items"], [12, 22]), "shards[1].items"),
    "unknown dtype": (lambda m: m["copies"].update(float64=m["copies"]["float32"]), "unknown dtype 'float64'"),
    "no copies": (_set(["copies"], {}), "field copies"),
    "int8 without scale": (lambda m: m["copies"]["int8"][1].pop("scale"), "copies.int8[1].scale"),
    "bad sha256": (_set(["copies", "float32", 0, "sha256"], "abc"), "copies.float32[0].sha256"),
    "same file twice": (_set(["copies", "float32", 1, "file"], "float32/shard-00000.npy"), "used twice"),
    "complete a string": (_set(["complete"], "yes"), "field complete"),
    "shards a dict": (_set(["shards"], {}), "field shards"),
    "shard a list": (_set(["shards", 0], []), "shards[0]"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_manifest(run_cli, store, case):
    change, field = TAMPERING[case]
    m = json.loads((store / MANIFEST).read_text())
    change(m)
    (store / MANIFEST).write_text(json.dumps(m))
    refused_by_both(run_cli, store, [MANIFEST, field])


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "\xff\xfe", "[" * 100000])
def test_unreadable_manifest(run_cli, store, text):
    (store / MANIFEST).write_bytes(text.encode("latin-1"))
    refused_by_both(run_cli, store, [MANIFEST])


def test_symlinked_shard_leading_out_of_the_store(run_cli, store):
    outside = store.parent / "other" / "float32" / "shard-00001.npy"
    (store / "float32" / "shard-00001.npy").unlink()
    os.symlink(outside, store / "float32" / "shard-00001.npy")
    refused_by_both(run_cli, store, [MANIFEST, "copies.float32[1].file", "leads out of the store"])


def test_symlinked_folder_leading_out_of_the_store(run_cli, store):
    shutil.rmtree(store / "names")
    os.symlink(store.parent / "other" / "names", store / "names")
    refused_by_both(run_cli, store, [MANIFEST, "shards[0].names", "leads out of the store"])


def test_symlink_inside_the_store_is_followed(run_cli, store):
    # a link that stays inside the store is fine (hashes still guard the content)
    os.rename(store / "float32" / "shard-00001.npy", store / "moved.npy")
    os.symlink("../moved.npy", store / "float32" / "shard-00001.npy")
    code, _, err = run_cli("store", "info", store, "--verify")
    assert code == 0, err
