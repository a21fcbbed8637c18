"""Growing and shrinking a store: add, remove, compact, each a new generation a reader sees whole."""
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine.errors import EXIT_INPUT, EngineError
from engine.gallery import Change, add_vectors, compact, remove_names
from engine.store import MANIFEST, add_copy, open_store, write_store

D = 8


def vectors(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def small(tmp_path):
    """An imported 30-row store in shards of 8, with an int8 copy beside its float32 one."""
    v = vectors(30)
    write_store(tmp_path / "s", v, "space-a", [f"n{i}" for i in range(30)], shard_rows=8)
    add_copy(tmp_path / "s", "int8")
    return tmp_path / "s", v


def one_line_error(result, *words):
    code, out, err = result
    assert code == EXIT_INPUT and err.count("\n") == 1 and err.startswith("error: "), (code, err)
    for w in words:
        assert w in err, (w, err)


# ---------------------------------------------------------------- add


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    """Six small photographs: the first four in a/, the last two in b/, all six in all/."""
    from skimage import data

    root = tmp_path_factory.mktemp("growth_photos")
    for sub in ("a", "b", "all"):
        (root / sub).mkdir()
    for i, photo in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera(), data.cat()]):
        img = Image.fromarray(photo[::6, ::6])
        img.save(root / ("a" if i < 4 else "b") / f"im{i}.png")
        img.save(root / "all" / f"im{i}.png")
    return root


ENCODE = ["--max-side", 64, "--workers", 0, "--batch-size", 1, "--runner", "torch"]
RUN = ["--workers", 0, "--batch-size", 1, "--runner", "torch"]


def test_add_equals_encoding_the_union_in_every_copy(photo_dirs, run_cli, tmp_path):
    s, u = tmp_path / "s", tmp_path / "u"
    for images, out in ((photo_dirs / "a", s), (photo_dirs / "all", u)):
        code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--images", images, "--out", out, "--shard-rows", 3, *ENCODE)
        assert code == 0, err
    assert run_cli("store", "convert", s, "--dtype", "int8")[0] == 0
    assert open_store(s).generation == 2  # the encode, then the copy
    code, _, err = run_cli("store", "add", s, "--images", photo_dirs / "b", *RUN)
    assert code == 0 and "generation 3" in err, err
    add_copy(u, "int8")
    got, want = open_store(s, checksums=True), open_store(u)
    assert got.generation == 3 and got.count == 6 and got.names() == want.names()
    np.testing.assert_array_equal(got.vectors(), want.vectors())  # bit for bit: the store's own encoder and options
    np.testing.assert_array_equal(got.vectors("int8"), want.vectors("int8"))
    assert got.space == want.space

    # a name the store holds is refused, nothing written; after removing it, it can be added again
    before = (s / MANIFEST).read_bytes()
    one_line_error(run_cli("store", "add", s, "--images", photo_dirs / "b", *RUN), "im4.png", "already holds")
    assert (s / MANIFEST).read_bytes() == before
    (tmp_path / "gone.txt").write_text("im4.png\nim5.png\n")
    assert run_cli("store", "remove", s, "--names", tmp_path / "gone.txt")[0] == 0
    assert run_cli("store", "add", s, "--images", photo_dirs / "b", *RUN)[0] == 0
    again = open_store(s)
    assert again.count == 8 and again.deleted_rows().tolist() == [4, 5]
    np.testing.assert_array_equal(again.vectors()[6:], want.vectors()[4:])


def test_add_refuses_imported_stores_and_a_foreign_encoder(small, photo_dirs, run_cli):
    path, _ = small
    one_line_error(run_cli("store", "add", path, "--images", photo_dirs / "b", *RUN), str(path), "records no encoder")
    from engine.encode import store_encoder

    m = json.loads((path / MANIFEST).read_text())
    m["info"] = {"encoder": {"name": "mystery", "role": "teacher"}, "encode": {"max_side": 64, "scales": [1.0]}}
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="not a registry teacher: pass that encoder"):
        store_encoder(path)
    other = SimpleNamespace(space="effnet-lite2-gem:0123456789abcdef", dim=D)  # another encoder's space id
    with pytest.raises(EngineError, match="only the store's own encoder"):
        store_encoder(path, other)


def test_add_vectors_keeps_every_copy_in_step(small):
    path, v = small
    extra = vectors(11, seed=1)
    store = add_vectors(path, extra, [f"x{i}" for i in range(11)])
    assert store.count == 41 and store.generation == 3
    np.testing.assert_array_equal(store.vectors(), np.concatenate([v, extra]))
    assert np.abs(store.vectors("int8") - store.vectors()).max() < 1.5e-2
    assert [s["rows"] for s in store.manifest["shards"]] == [8, 8, 8, 6, 8, 3]
    with pytest.raises(EngineError, match="'x1' is given twice"):
        add_vectors(path, extra[:2], ["x1", "x1"])
    with pytest.raises(EngineError, match="already holds 1 of these names \\('n3'\\)"):
        add_vectors(path, extra[:2], ["n3", "new"])
    assert open_store(path).generation == 3


# ---------------------------------------------------------------- remove


def test_remove_marks_rows_and_keeps_the_others_ids(small, run_cli, tmp_path):
    path, v = small
    (tmp_path / "gone.txt").write_text("n3\nn17\n\nn29\n")
    code, _, err = run_cli("store", "remove", path, "--names", tmp_path / "gone.txt")
    assert code == 0 and "removed 3 row(s)" in err, err
    store = open_store(path, checksums=True)
    assert store.deleted_rows().tolist() == [3, 17, 29] and store.deleted_rows().dtype == np.int64
    assert store.generation == 3 and store.count == 30
    np.testing.assert_array_equal(store.vectors(), v)  # nothing moved: the other rows keep their ids

    # an unknown name (or one already removed) is refused, naming it, and nothing changes; --missing-ok skips it
    (tmp_path / "more.txt").write_text("n5\nn3\nnope\n")
    one_line_error(run_cli("store", "remove", path, "--names", tmp_path / "more.txt"), "'n3'", "1 other name", "--missing-ok")
    assert open_store(path).generation == 3
    code, _, err = run_cli("store", "remove", path, "--names", tmp_path / "more.txt", "--missing-ok")
    assert code == 0 and "removed 1 row(s), 4 removed in all" in err, err
    store = open_store(path)
    assert store.deleted_rows().tolist() == [3, 5, 17, 29] and store.generation == 4
    assert sorted(p.name for p in (path / "deleted").iterdir()) == ["gen-00004.npy"]  # the superseded list is gone
    one_line_error(run_cli("store", "remove", path, "--names", tmp_path / "missing.txt"), "missing.txt")


def test_search_never_returns_removed_rows(small):
    """Needs the index branch (engine.search filters Store.deleted_rows())."""
    from engine.search import search

    path, v = small
    remove_names(path, [f"n{i}" for i in (0, 9, 10, 22)])
    store = open_store(path)
    for scan in ("float32", "int8"):
        _, ids = search(store, v, 10, scan=scan)
        assert not np.isin(ids, [0, 9, 10, 22]).any()
        kept = np.setdiff1d(np.arange(30), [0, 9, 10, 22])
        np.testing.assert_array_equal(ids[kept, 0], kept)  # each kept row still finds itself first, by its old id


def test_tombstones_are_validated_on_open(small):
    path, _ = small
    remove_names(path, ["n4", "n8"])
    good = json.loads((path / MANIFEST).read_text())
    rel = good["deleted"]["file"]

    def tampered(change, match, name=MANIFEST):
        m = json.loads(json.dumps(good))
        change(m)
        (path / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(EngineError, match=match) as e:
            open_store(path)
        assert name in str(e.value)

    tampered(lambda m: m.update(generation=-1), "field generation: must be >= 0")
    tampered(lambda m: m.update(generation="3"), "field generation: expected an integer")
    tampered(lambda m: m["deleted"].update(file="../x.npy"), "not a plain relative path")
    tampered(lambda m: m["deleted"].update(rows=31), "more than the store's 30 rows")
    tampered(lambda m: m["deleted"].update(rows=3), "the manifest says int64 \\(3,\\)", rel)
    (path / MANIFEST).write_text(json.dumps(good))
    np.save(path / rel, np.array([8, 4], np.int64))
    with pytest.raises(EngineError, match="increasing row numbers"):
        open_store(path)
    np.save(path / rel, np.array([4, 30], np.int64))
    with pytest.raises(EngineError, match="increasing row numbers in \\[0, 30\\)"):
        open_store(path)


# ---------------------------------------------------------------- compact


def test_compact_maps_old_ids_to_new_and_an_open_store_keeps_its_generation(small, run_cli):
    path, v = small
    remove_names(path, ["n0", "n7", "n8", "n20"])
    old = open_store(path)
    code, _, err = run_cli("store", "compact", path)
    assert code == 0 and "26 rows, generation 4" in err, err
    store = open_store(path, checksums=True)
    id_map = np.load(path / "maps" / "compact-gen-00004.npy")
    assert str(path / "maps" / "compact-gen-00004.npy") in err
    assert id_map.dtype == np.int64 and id_map.shape == (30,)
    assert (id_map[[0, 7, 8, 20]] == -1).all() and sorted(id_map[id_map >= 0]) == list(range(26))
    assert len(store.deleted_rows()) == 0 and store.count == 26
    for dtype in ("float32", "int8"):
        np.testing.assert_array_equal(store.vectors(dtype)[id_map[id_map >= 0]], old.vectors(dtype)[id_map >= 0])
    assert store.names() == [n for i, n in enumerate(old.names()) if id_map[i] >= 0]
    assert [s["rows"] for s in store.manifest["shards"]] == [8, 8, 8, 2]
    assert not (path / "deleted").exists() or not list((path / "deleted").iterdir())
    assert not list((path / "float32").glob("shard-0000?.npy"))  # the old generation's files are unlinked...
    np.testing.assert_array_equal(old.vectors(), v)  # ...and a store opened before still reads its generation whole
    assert old.names() == [f"n{i}" for i in range(30)]
    code, _, err = run_cli("store", "compact", path)
    assert code == 0 and "nothing to do" in err and open_store(path).generation == 4


def test_a_change_needs_the_write_lock(small):
    path, v = small
    with Change(path):
        with pytest.raises(EngineError, match="being written by"):
            add_vectors(path, vectors(2, 5), ["a", "b"])
        with pytest.raises(EngineError, match="being written by"):
            compact(path)
    assert open_store(path).generation == 2


def test_a_reader_during_changes_sees_one_generation_whole(tmp_path):
    """A thread reopening the store in a loop while adds, removals and compactions publish: every read is one
    published generation's vectors and names, as its writer published them."""
    path = tmp_path / "s"
    write_store(path, vectors(5), "space-a", [f"r0-{i}" for i in range(5)], shard_rows=4)
    add_copy(path, "int8")
    published = {}
    reads = []
    done = threading.Event()

    errors = []

    def reader():
        try:
            while not done.is_set():
                store = open_store(path)
                reads.append((store.generation, store.vectors(), store.vectors("int8"), store.names(), store.deleted_rows().tolist()))
        except Exception as e:  # noqa: BLE001 (reported by the test below)
            errors.append(e)

    def record():
        store = open_store(path)
        published[store.generation] = (store.vectors(), store.vectors("int8"), store.names(), store.deleted_rows().tolist())

    record()
    thread = threading.Thread(target=reader)
    thread.start()
    changes = 0
    try:
        for r in range(1, 11):
            add_vectors(path, vectors(5, seed=r), [f"r{r}-{i}" for i in range(5)])
            record()
            changes += 1
            if r % 3 == 0:
                remove_names(path, [f"r{r}-1", f"r{r - 1}-3"])
                record()
                changes += 1
            if r % 5 == 0:
                compact(path)
                record()
                changes += 1
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert len(published) == changes + 1 and max(published) == 2 + changes  # each change: one generation more
    assert len({g for g, *_ in reads}) >= 2  # the reader ran across changes
    for gen, vec, vec8, names, deleted in reads:
        want = published[gen]
        np.testing.assert_array_equal(vec, want[0])
        np.testing.assert_array_equal(vec8, want[1])
        assert names == want[2] and deleted == want[3]


def test_an_open_that_a_compaction_overtakes_starts_over_at_the_new_generation(small, monkeypatch):
    from engine.store import Store

    path, v = small
    remove_names(path, ["n1"])
    real, seen = Store.verify, []

    def verify(self, checksums=False):
        if not seen:  # between reading generation 3's manifest and mapping its files, a compaction unlinks them
            seen.append(self.generation)
            compact(path)
        return real(self, checksums)

    monkeypatch.setattr(Store, "verify", verify)
    store = open_store(path)
    assert seen == [3] and store.generation == 4 and store.count == 29
    np.testing.assert_array_equal(store.vectors(), np.delete(v, 1, axis=0))
