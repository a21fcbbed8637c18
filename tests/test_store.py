"""The gallery store: round trip, dtypes, resume after an interruption, and detection of damaged shards."""
import json

import numpy as np
import pytest

from engine import quantize
from engine.errors import EngineError
from engine.store import MANIFEST, StoreWriter, add_copy, open_store, write_store


def vectors(n=250, d=16, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_round_trip_across_shards(tmp_path):
    v = vectors()
    names = [f"img{i}" for i in range(len(v))]
    write_store(tmp_path / "s", v, "space-a", names, shard_rows=64)
    store = open_store(tmp_path / "s", checksums=True)
    assert (store.count, store.dim, store.space) == (250, 16, "space-a")
    assert len(store.manifest["shards"]) == 4
    np.testing.assert_array_equal(store.vectors(), v)
    assert store.names() == names
    assert [s.start for s in store.shards()] == [0, 64, 128, 192]


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3), ("int8", 1.5e-2)])
def test_compressed_dtypes_decode_close(tmp_path, dtype, tol):
    v = vectors()
    write_store(tmp_path / "s", v, "x", dtype=dtype, shard_rows=100)
    store = open_store(tmp_path / "s", checksums=True)
    assert store.dtypes == [dtype]
    assert np.abs(store.vectors() - v).max() < tol


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5], np.float32)  # halfway cases in bfloat16
    back = quantize.bfloat16_bits_to_float32(quantize.float32_to_bfloat16_bits(x))
    np.testing.assert_array_equal(back, [1.0, 1.0, 1.015625, -2.5])


def test_add_copy_keeps_rows_aligned(tmp_path):
    v = vectors()
    store = write_store(tmp_path / "s", v, "x", shard_rows=100)
    add_copy(store, "int8")
    store = open_store(tmp_path / "s", checksums=True)
    assert set(store.dtypes) == {"float32", "int8"}
    assert np.abs(store.vectors("int8") - v).max() < 1.5e-2
    assert store.exact_dtype == "float32"


def test_interrupted_writer_resumes_after_last_whole_shard(tmp_path):
    v = vectors(300)
    path = tmp_path / "s"
    w = StoreWriter(path, "x", 16, shard_rows=100, n_items=300, source_key="job1")
    w.add_shard(v[:100], [str(i) for i in range(100)])
    # a crash while writing shard 1 leaves only a temporary file behind
    (path / "float32" / "shard-00001.npy.tmp").write_bytes(b"partial")
    with pytest.raises(EngineError, match="incomplete"):
        open_store(path)
    w2 = StoreWriter(path, "x", 16, shard_rows=100, n_items=300, source_key="job1")
    assert w2.items_done == 100
    for a in (100, 200):
        w2.add_shard(v[a:a + 100], [str(i) for i in range(a, a + 100)])
    store = w2.finish()
    np.testing.assert_array_equal(open_store(path, checksums=True).vectors(), v)
    assert store.count == 300


def test_resume_with_another_job_is_refused(tmp_path):
    StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, source_key="job1")
    with pytest.raises(EngineError, match="source_key"):
        StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, source_key="job2")


def test_truncated_shard_is_named(tmp_path):
    write_store(tmp_path / "s", vectors(), "x", shard_rows=100)
    shard = tmp_path / "s" / "float32" / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(EngineError, match="shard-00001"):
        open_store(tmp_path / "s")


def test_altered_shard_fails_checksum(tmp_path):
    write_store(tmp_path / "s", vectors(), "x", shard_rows=100)
    shard = tmp_path / "s" / "float32" / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_store(tmp_path / "s")  # sizes and headers still agree
    with pytest.raises(EngineError, match="shard-00002.*checksum"):
        open_store(tmp_path / "s", checksums=True)


def test_foreign_file_as_shard_is_named(tmp_path):
    write_store(tmp_path / "s", vectors(), "x", shard_rows=100)
    np.save(tmp_path / "s" / "float32" / "shard-00000.npy", np.zeros((100, 8), np.float64))
    with pytest.raises(EngineError, match="shard-00000.*manifest says"):
        open_store(tmp_path / "s")


def test_not_a_store(tmp_path):
    with pytest.raises(EngineError, match="no such store"):
        open_store(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(EngineError, match="not a store"):
        open_store(tmp_path / "d")
    (tmp_path / "d" / MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(EngineError, match="not an aml-engine-store"):
        open_store(tmp_path / "d")


def test_writing_into_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("user data")
    with pytest.raises(EngineError, match="not a store"):
        write_store(tmp_path / "d", vectors(), "x")
    assert (tmp_path / "d" / "keep.txt").read_text() == "user data"
