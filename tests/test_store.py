"""The gallery store: round trip, dtypes, resume after an interruption, and detection of damaged shards."""
import json
import os

import numpy as np
import pytest
from PIL import Image

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
    # a crash while writing shard 1 leaves a temporary file and maybe the whole shard file, not yet in the manifest
    (path / "float32" / "shard-00001.npy.123.456.tmp").write_bytes(b"partial")
    (path / "float32" / "shard-00001.npy").write_bytes(b"orphan")
    w.close()  # the process died: the kernel dropped its lock
    with pytest.raises(EngineError, match="incomplete"):
        open_store(path)
    w2 = StoreWriter(path, "x", 16, shard_rows=100, n_items=300, source_key="job1")
    assert w2.items_done == 100
    for a in (100, 200):
        w2.add_shard(v[a:a + 100], [str(i) for i in range(a, a + 100)])
    store = w2.finish()
    np.testing.assert_array_equal(open_store(path, checksums=True).vectors(), v)
    assert store.count == 300
    assert not list(path.rglob("*.tmp"))


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


def test_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    w = StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, source_key="job")
    with pytest.raises(EngineError, match=rf"being written by pid {os.getpid()} on .* since ") as e:
        StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, source_key="job")
    assert str(tmp_path / "s") in str(e.value)
    with pytest.raises(EngineError, match="being written by"):
        add_copy(tmp_path / "s", "int8")
    w.add_shard(vectors(10), [str(i) for i in range(10)])
    w.close()  # as the kernel does when the holder dies: the lock file stays, the lock is free
    assert (tmp_path / "s" / ".lock").exists()
    with StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, source_key="job") as w2:
        assert w2.items_done == 10


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float64"}, "unknown vector dtype 'float64'"),
    ({"dtype": "x"}, "unknown vector dtype 'x'"),
    ({"shard_rows": 0}, "shard_rows must be a positive integer, got 0"),
    ({"shard_rows": -1}, "shard_rows must be a positive integer, got -1"),
])
def test_bad_dtype_or_shard_rows_is_an_error_before_anything_is_written(tmp_path, kwargs, match):
    with pytest.raises(EngineError, match=match):
        write_store(tmp_path / "s", vectors(), "x", **kwargs)
    with pytest.raises(EngineError, match=match):
        StoreWriter(tmp_path / "s", "x", 16, **kwargs)
    assert not (tmp_path / "s").exists()


def test_out_that_is_a_file_or_under_a_file_is_refused_leaving_nothing(tmp_path):
    (tmp_path / "f").write_text("user data")
    with pytest.raises(EngineError, match="is a file"):
        write_store(tmp_path / "f", vectors(), "x")
    with pytest.raises(EngineError, match="cannot create the store folder"):
        write_store(tmp_path / "f" / "s", vectors(), "x")
    assert (tmp_path / "f").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_refused(tmp_path, bad):
    v = vectors()
    v[77, 3] = bad
    with pytest.raises(EngineError, match="row 77 .*img77.*NaN or infinite"):
        write_store(tmp_path / "s", v, "x", [f"img{i}" for i in range(len(v))])
    assert not (tmp_path / "s").exists()
    with StoreWriter(tmp_path / "t", "x", 16, shard_rows=100) as w:
        w.add_shard(v[:50], [str(i) for i in range(50)])
        with pytest.raises(EngineError, match="row 77 .*NaN or infinite"):
            w.add_shard(v[50:150], [str(i) for i in range(50, 150)])
        assert w.rows_done == 50


def test_rewritten_shard_gets_new_files_and_later_rows_shift(tmp_path):
    v = vectors(30)
    with StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, n_items=30) as w:
        for a in (0, 10, 20):
            w.add_shard(v[a:a + 10], [str(i) for i in range(a, a + 10)], (a, a + 10), sources=f"src{a}")
        w.finish()
    add_copy(tmp_path / "s", "int8")
    untouched = {p: p.stat().st_ino for p in (tmp_path / "s").rglob("shard-0000[02]*")}
    with StoreWriter(tmp_path / "s", "x", 16, shard_rows=10, n_items=30) as w:
        # shard 1's inputs changed: one of them is now unreadable (skipped), the others encode anew
        w.replace_shard(1, -v[10:19], [str(i) for i in range(10, 19)], [{"item": 19, "path": "19", "error": "bad"}], "new1")
        assert not w.complete
        w.finish()
    store = open_store(tmp_path / "s", checksums=True)
    assert store.count == 29 and [s.start for s in store.shards()] == [0, 10, 19]
    np.testing.assert_array_equal(store.vectors(), np.concatenate([v[:10], -v[10:19], v[20:]]))
    assert np.abs(store.vectors("int8") - store.vectors()).max() < 1.5e-2
    assert store.names()[10:20] == [str(i) for i in range(10, 19)] + ["20"]
    assert not list((tmp_path / "s").rglob("shard-00001.*"))  # the old generation's files are gone
    assert {p: p.stat().st_ino for p in (tmp_path / "s").rglob("shard-0000[02]*")} == untouched


def test_manifest_is_validated_on_open(tmp_path):
    write_store(tmp_path / "s", vectors(), "x", shard_rows=100)
    good = json.loads((tmp_path / "s" / MANIFEST).read_text())

    def tampered(change, match):
        m = json.loads(json.dumps(good))
        change(m)
        (tmp_path / "s" / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(EngineError, match=match) as e:
            open_store(tmp_path / "s")
        assert MANIFEST in str(e.value)

    tampered(lambda m: m.update(dim=16.0), "field dim: expected an integer")
    tampered(lambda m: m.update(count=True), "field count: expected an integer")
    tampered(lambda m: m.update(space=""), "field space")
    tampered(lambda m: m["shards"][1].update(start=99), r"shards\[1\].start: is 99, expected 100")
    tampered(lambda m: m["copies"]["float32"][0].update(file="/etc/passwd"), "not a plain relative path")
    tampered(lambda m: m["copies"]["float32"][0].update(file="../x.npy"), "not a plain relative path")
    tampered(lambda m: m["copies"].update(float64=[]), "unknown dtype 'float64'")


def test_rerun_after_an_image_changed_rewrites_exactly_its_shard(tmp_path, run_cli):
    from skimage import data

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, photo in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(), data.cat()]):
        Image.fromarray(photo[::6, ::6]).save(imgs / f"im{i}.png")
    out = tmp_path / "s"
    args = ["encode", "--model", "effnet-lite2-gem", "--images", imgs, "--out", out, "--max-side", 64, "--shard-rows", 2,
            "--workers", 0, "--batch-size", 1, "--runner", "torch"]

    def files():  # inode and bytes of every file: a rewrite shows even within one mtime tick
        return {p.relative_to(out): (p.stat().st_ino, p.read_bytes()) for p in out.rglob("shard-*")}

    assert run_cli(*args)[0] == 0
    before, v0 = files(), open_store(out).vectors()
    assert run_cli(*args)[0] == 0 and files() == before  # unchanged images: nothing rewritten
    (imgs / "im2.png").write_bytes((imgs / "im5.png").read_bytes())  # another photograph under the same name
    code, _, err = run_cli(*args)
    assert code == 0, err
    store = open_store(out, checksums=True)
    v1 = store.vectors()
    np.testing.assert_array_equal(v1[2], v0[5])  # row 2 now holds the new photograph's vector
    np.testing.assert_array_equal(np.delete(v1, 2, axis=0), np.delete(v0, 2, axis=0))
    after = files()
    assert {k: v for k, v in after.items() if "shard-00001" not in str(k)} == {k: v for k, v in before.items() if "shard-00001" not in str(k)}
    assert not set(before) & {k for k in after if "shard-00001" in str(k)}  # shard 1 under new names, the old ones gone
    assert store.names() == [f"im{i}.png" for i in range(6)]


@pytest.mark.parametrize("array,match", [
    (np.ones((2, 4), np.complex64), "complex64"),
    (np.array([["a", "b"]]), "<U1"),
    (np.zeros(2, dtype=[("x", np.float32), ("y", np.float32)]), "dtype"),
    (np.ones((2, 4), bool), "bool"),
    (np.ones(4, np.float32), "Q x D"),
    (np.array([[1.0, np.nan]], np.float32), "row 0 holds NaN"),
    (np.array([[1.0, 2.0], [1e300, 0.0]]), "row 1 holds NaN or infinite values \\(or overflows float32\\)"),
])
def test_load_vectors_refuses_what_is_not_real_finite_numbers(tmp_path, array, match):
    from engine.encode import load_vectors

    np.save(tmp_path / "v.npy", array)
    with pytest.raises(EngineError, match=match) as e:
        load_vectors(tmp_path / "v.npy")
    assert "v.npy" in str(e.value)


def test_object_npy_is_refused_without_unpickling(tmp_path):
    from engine.encode import load_vectors

    np.save(tmp_path / "v.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EngineError, match="v.npy: not a readable .npy"):
        load_vectors(tmp_path / "v.npy")


@pytest.mark.parametrize("sidecar,match", [
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"dim": "4"}', "dim must be an integer"),
    ('{"dim": 4.0}', "dim must be an integer"),
    ('{"dim": 5}', "says D = 5"),
    ('{"space": 3}', "space must be a non-empty string"),
    ('{"names": "ab"}', "names must be a list of strings"),
    ('{"names": ["a", 2]}', "names must be a list of strings"),
    ('{"names": ["a"]}', "names 1 rows, the array has 2"),
    ("{oops", "unreadable sidecar"),
])
def test_malformed_sidecar_is_one_error_naming_it(tmp_path, sidecar, match):
    from engine.encode import load_vectors

    np.save(tmp_path / "v.npy", np.ones((2, 4), np.float32))
    (tmp_path / "v.npy.json").write_text(sidecar)
    with pytest.raises(EngineError, match=match) as e:
        load_vectors(tmp_path / "v.npy")
    assert "v.npy.json" in str(e.value)


def test_save_vectors_into_a_folder_or_under_a_file_is_refused_leaving_nothing(tmp_path):
    from engine.encode import save_vectors

    (tmp_path / "q.npy").mkdir()
    with pytest.raises(EngineError, match="is a folder"):
        save_vectors(tmp_path / "q.npy", np.ones((2, 4), np.float32), {})
    (tmp_path / "f").write_text("x")
    with pytest.raises(EngineError, match="is a file, not a folder"):
        save_vectors(tmp_path / "f" / "q.npy", np.ones((2, 4), np.float32), {})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["f", "q.npy"]


def test_non_finite_encoder_output_names_the_image(tmp_path, monkeypatch):
    import torch

    from engine import encode

    class Runner:
        device = torch.device("cpu")

    def describe(encoder, images, scales, runner):  # an encoder that overflows on the second image
        return torch.tensor([[float("nan") if images.mean() > 0.5 else 1.0, 0.0]])

    monkeypatch.setattr(encode, "describe", describe)
    items = []
    for i, value in enumerate((0, 255)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / f"im{i}.png")
        items.append((tmp_path / f"im{i}.png", None))
    opts = encode.EncodeOptions(max_side=8, batch_size=1, workers=0, progress=False)
    with pytest.raises(EngineError, match="im1.png: the encoder gave NaN or infinite values"):
        list(encode.encode_items(None, items, opts, Runner()))
    opts.skip_bad = True
    out = list(encode.encode_items(None, items, opts, Runner()))
    assert out[0][1] is not None and out[1][1] is None and "NaN" in out[1][2]
