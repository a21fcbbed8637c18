"""SfM-120k-format training sets (real and flat layouts), the whitening pickle, and users' own data converted."""
import json
import pickle
import struct
import warnings

import numpy as np
import pytest

from engine.datasets import convert, sfm
from engine.datasets.revisited import load_gnd, query_items
from engine.errors import EngineError
from engine.pickles import read_pickle, write_pickle

CIDS = ["a1b2c3d4", "e5f6a7b8", "0c1d2e3f", "9a8b7c6d", "5e4f3a2b"]
SPLIT = {"cids": CIDS, "cluster": [7, 7, 3, 3, 9], "qidxs": [0, 2], "pidxs": [1, 3]}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path


@pytest.fixture
def sfm_root(tmp_path):
    """The real SfM-120k layout: sfm120k/dbs/*.pkl and sfm120k/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>."""
    root = tmp_path / "sfm120k"
    for cid in CIDS:
        p = root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"jpeg")
    write(root / "dbs" / "retrieval-SfM-120k.pkl", {"train": SPLIT, "val": {**SPLIT, "qidxs": [1], "pidxs": [0]}})
    write(root / "dbs" / "retrieval-SfM-120k-whiten.pkl", {"cids": CIDS, "qidxs": [0, 3], "pidxs": [1, 2]})
    return root


def load_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sfm.DatasetWarning)
        return sfm.load_training_set(*args, **kwargs)


def test_real_layout_found_and_loaded(sfm_root):
    with pytest.warns(sfm.DatasetWarning, match="1 single-image clusters .*only as negatives"):
        ts = sfm.load_training_set(sfm_root / "dbs" / "retrieval-SfM-120k.pkl")
    assert ts.images[0] == sfm_root / "ims" / "d4" / "c3" / "b2" / "a1b2c3d4"
    assert ts.cluster.dtype == np.int64 and ts.cluster.tolist() == [7, 7, 3, 3, 9]
    assert ts.qidxs.tolist() == [0, 2] and ts.pidxs.tolist() == [1, 3]
    val = load_quiet(sfm_root / "dbs" / "retrieval-SfM-120k.pkl", split="val", layout="sfm")
    assert val.qidxs.tolist() == [1] and val.pidxs.tolist() == [0]
    wh = sfm.load_whitening_set(sfm_root / "dbs" / "retrieval-SfM-120k-whiten.pkl")
    assert len(wh.images) == 5 and wh.qidxs.tolist() == [0, 3] and wh.pidxs.tolist() == [1, 2]


def test_whitening_pairs_from_either_format_and_their_own_errors(sfm_root):
    db = load_quiet(sfm_root / "dbs" / "retrieval-SfM-120k.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sfm.DatasetWarning)
        from_db = sfm.load_whitening_set(sfm_root / "dbs" / "retrieval-SfM-120k.pkl")  # a db: its training pairs
    assert from_db.images == db.images and from_db.qidxs.tolist() == db.qidxs.tolist()
    bad = write(sfm_root / "dbs" / "bad-whiten.pkl", {"cids": CIDS, "qidxs": [0, 9], "pidxs": [1, 2]})
    with pytest.raises(EngineError, match="bad-whiten.pkl") as e:
        sfm.load_whitening_set(bad)
    assert "no split" not in str(e.value)  # the pairs' own problem, not a db's missing split


def test_flat_layout_of_the_views_benchmark(tmp_path):
    for cid in CIDS:
        (tmp_path / "jpg").mkdir(exist_ok=True)
        (tmp_path / "jpg" / f"{cid}.jpg").write_bytes(b"jpeg")
    db = write(tmp_path / "train" / "db.pkl", {"train": SPLIT})
    ts = load_quiet(db)
    assert ts.images == [tmp_path / "jpg" / f"{c}.jpg" for c in CIDS]
    with pytest.raises(EngineError, match="5 of 5 images are missing in the 'sfm' layout"):
        load_quiet(db, layout="sfm", images_root=tmp_path / "jpg")


@pytest.mark.parametrize("change, message", [
    ({"cluster": [7, 7, 3]}, "'cluster' has 3 entries for 5 cids"),
    ({"qidxs": [0, 2, 4]}, "3 qidxs but 2 pidxs"),
    ({"pidxs": [1, 5]}, r"train.pidxs\[1\] = 5 is outside the 5 images"),
    ({"pidxs": [0, 3]}, "pair 0 uses image 0 as its own positive"),
    ({"pidxs": [2, 3]}, "pair 0 joins clusters 7 and 3"),
    ({"qidxs": [4, 2]}, "query 4 .* only image of cluster 9"),
    ({"cluster": [7.0, 7.0, 3.0, 3.0, 9.0]}, r"'train.cluster'\[0\] must be an integer, not float 7.0"),
    ({"cluster": np.array([7.0, 7, 3, 3, 9])}, "'train.cluster' must be a flat list of integers, got a float64 array"),
    ({"cluster": np.array([[7, 7, 3, 3, 9]])}, r"got a int64 array of shape \(1, 5\)"),
    ({"qidxs": [0, True]}, r"'train.qidxs'\[1\] must be an integer, not bool"),
    ({"qidxs": [0, "2"]}, r"'train.qidxs'\[1\] must be an integer, not str '2'"),
    ({"qidxs": [[0], [2]]}, r"'train.qidxs'\[0\] must be an integer, not list"),
    ({"qidxs": 3}, "'train.qidxs' must be a flat list of integers, not int 3"),
    ({"pidxs": [1, 2**70]}, r"'train.pidxs'\[1\] must be an integer"),
    ({"cids": "a1b2c3d4"}, "'train.cids' must be a list of names, not str"),
    ({"cids": [*CIDS[:4], 5]}, r"'train.cids'\[4\] must be a non-empty string, not int 5"),
    ({"cids": [*CIDS[:4], ""]}, r"'train.cids'\[4\] must be a non-empty string"),
])
def test_malformed_split_is_named(sfm_root, change, message):
    db = write(sfm_root / "dbs" / "bad.pkl", {"train": {**SPLIT, **change}})
    with pytest.raises(EngineError, match=message) as err:
        load_quiet(db, check_images=False)
    assert "bad.pkl" in str(err.value)


def test_missing_split_keys_and_images_are_named(sfm_root):
    db = sfm_root / "dbs" / "retrieval-SfM-120k.pkl"
    with pytest.raises(EngineError, match="no split 'test'"):
        load_quiet(db, split="test")
    write(sfm_root / "dbs" / "mixed.pkl", {1: {}, "val": {}})
    with pytest.raises(EngineError, match=r"no split 'train' .* has \[\"'val'\", '1'\]"):
        load_quiet(sfm_root / "dbs" / "mixed.pkl")
    write(sfm_root / "dbs" / "list.pkl", [SPLIT])
    with pytest.raises(EngineError, match="no split 'train' .* has list"):
        load_quiet(sfm_root / "dbs" / "list.pkl")
    write(sfm_root / "dbs" / "notdict.pkl", {"train": [SPLIT]})
    with pytest.raises(EngineError, match=r"db\['train'\] must be a dict with .* \(has list"):
        load_quiet(sfm_root / "dbs" / "notdict.pkl")
    write(sfm_root / "dbs" / "nokeys.pkl", {"train": {"cids": CIDS}})
    with pytest.raises(EngineError, match="must be a dict with 'cids', 'cluster', 'qidxs', 'pidxs'"):
        load_quiet(sfm_root / "dbs" / "nokeys.pkl")
    lost = sfm_root / "ims" / "3f" / "2e" / "1d" / "0c1d2e3f"
    lost.unlink()
    with pytest.raises(EngineError, match=f"1 of 5 images are missing .*{lost}"):
        load_quiet(db, layout="sfm")
    write(sfm_root / "dbs" / "first.pkl", {"train": {**SPLIT, "cids": ["0c1d2e3f", *CIDS[1:]]}})
    with pytest.raises(EngineError, match="in neither layout"):
        load_quiet(sfm_root / "dbs" / "first.pkl")


def make_images(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"jpeg")


def test_convert_training_csv_to_a_loadable_db(tmp_path):
    names = [f"shop/{i}.jpg" for i in range(6)] + ["bridge/a.jpg", "bridge/b.jpg", "lone.jpg"]
    make_images(tmp_path, names)
    instances = ["shop"] * 6 + ["bridge"] * 2 + ["lone"]
    splits = ["train"] * 6 + ["val", "val", "train"]
    (tmp_path / "images.csv").write_text("path,instance,split\n" + "".join(
        f"{n},{i},{s}\n" for n, i, s in zip(names, instances, splits)))
    summary = convert.convert_training(tmp_path / "images.csv", tmp_path / "out" / "db.pkl")
    assert summary["train"] == {"images": 7, "clusters": 2, "pairs": 6}
    assert summary["val"] == {"images": 2, "clusters": 1, "pairs": 2}
    with pytest.warns(sfm.DatasetWarning, match="single-image"):
        ts = sfm.load_training_set(tmp_path / "out" / "db.pkl", images_root=tmp_path)
    assert ts.images[0] == tmp_path / "shop" / "0.jpg" and ts.images[6] == tmp_path / "lone.jpg"
    assert sorted(ts.qidxs.tolist()) == list(range(6))
    assert all(ts.cluster[q] == ts.cluster[p] and q != p for q, p in zip(ts.qidxs, ts.pidxs))
    convert.convert_training(tmp_path / "images.csv", tmp_path / "out" / "db2.pkl")
    assert (tmp_path / "out" / "db.pkl").read_bytes() == (tmp_path / "out" / "db2.pkl").read_bytes()  # seeded


def test_convert_training_jsonl_with_explicit_pairs(tmp_path):
    make_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    rows = [{"path": "a.jpg", "instance": 1}, {"path": str(tmp_path / "b.jpg"), "instance": 1}, {"path": "c.jpg", "instance": 2}]
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.csv").write_text("query,positive\nb.jpg,a.jpg\n")
    convert.convert_training(tmp_path / "images.jsonl", tmp_path / "db.pkl", pairs_file=tmp_path / "pairs.csv")
    db = pickle.loads((tmp_path / "db.pkl").read_bytes())
    assert db["train"] == {"cids": ["a.jpg", "b.jpg", "c.jpg"], "cluster": [0, 0, 1], "qidxs": [1], "pidxs": [0]}
    assert db["val"] == {"cids": [], "cluster": [], "qidxs": [], "pidxs": []}
    (tmp_path / "pairs.csv").write_text("query,positive\na.jpg,c.jpg\n")
    with pytest.raises(EngineError, match="pairs.csv: line 2: a pair must join two different images of one instance"):
        convert.convert_training(tmp_path / "images.jsonl", tmp_path / "db.pkl", pairs_file=tmp_path / "pairs.csv")


def test_convert_training_errors_name_file_and_line(tmp_path):
    make_images(tmp_path, ["a.jpg"])
    (tmp_path / "images.csv").write_text("path,instance\na.jpg,1\nmissing.jpg,1\n")
    with pytest.raises(EngineError, match="images.csv: line 3: image not found"):
        convert.convert_training(tmp_path / "images.csv", tmp_path / "db.pkl")
    (tmp_path / "images.csv").write_text("path\na.jpg\n")
    with pytest.raises(EngineError, match="line 2: missing 'instance'"):
        convert.convert_training(tmp_path / "images.csv", tmp_path / "db.pkl")
    (tmp_path / "images.txt").write_text("a.jpg 1\n")
    with pytest.raises(EngineError, match="must end in .csv or .jsonl"):
        convert.convert_training(tmp_path / "images.txt", tmp_path / "db.pkl")


def test_convert_test_to_a_loadable_gnd(tmp_path):
    gallery = ["g/0.jpg", "g/1.jpg", "g/2.jpg", "g/3.jpg", "q/0.jpg"]
    make_images(tmp_path, gallery + ["q/1.jpg"])
    (tmp_path / "gallery.csv").write_text("path\n" + "\n".join(gallery) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"path": "q/0.jpg", "bbx": [1, 2, 30, 40]}) + "\n"
                                            + json.dumps({"path": "q/1.jpg"}) + "\n")
    (tmp_path / "labels.csv").write_text("query,image,label\nq/0.jpg,g/2.jpg,positive\nq/0.jpg,g/0.jpg,hard\n"
                                         "q/0.jpg,g/1.jpg,junk\nq/1.jpg,g/3.jpg,easy\nq/1.jpg,g/3.jpg,easy\n")
    summary = convert.convert_test(tmp_path / "gallery.csv", tmp_path / "queries.jsonl", tmp_path / "labels.csv",
                                   tmp_path / "gnd.pkl")
    assert summary["gallery"] == 5 and summary["queries"] == 2 and summary["queries_without_positives"] == 0
    cfg = load_gnd(tmp_path / "gnd.pkl")
    assert cfg["imlist"] == gallery and cfg["qimlist"] == ["q/0.jpg", "q/1.jpg"]
    assert cfg["gnd"][0] == {"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [2], "hard": [0], "junk": [1, 4]}  # 4: itself
    assert cfg["gnd"][1] == {"bbx": None, "easy": [3], "hard": [], "junk": []}
    assert query_items(cfg, tmp_path)[0] == (tmp_path / "q" / "0.jpg", [1.0, 2.0, 30.0, 40.0])


def test_convert_test_errors(tmp_path):
    make_images(tmp_path, ["g.jpg", "q.jpg"])
    (tmp_path / "gallery.csv").write_text("path\ng.jpg\n")
    (tmp_path / "queries.csv").write_text("path,x1,y1,x2,y2\nq.jpg,5,5,1,9\n")
    (tmp_path / "labels.csv").write_text("query,image,label\nq.jpg,g.jpg,easy\n")
    args = [tmp_path / "gallery.csv", tmp_path / "queries.csv", tmp_path / "labels.csv", tmp_path / "gnd.pkl"]
    with pytest.raises(EngineError, match="queries.csv: line 2: box must be x1, y1, x2, y2 with x2 > x1"):
        convert.convert_test(*args)
    (tmp_path / "queries.csv").write_text("path,x1,y1,x2,y2\nq.jpg,1,1,5,9\n")
    (tmp_path / "labels.csv").write_text("query,image,label\nq.jpg,g.jpg,easy\nq.jpg,g.jpg,junk\n")
    with pytest.raises(EngineError, match="line 3: 'g.jpg' is labelled both easy and junk"):
        convert.convert_test(*args)
    (tmp_path / "labels.csv").write_text("query,image,label\nq.jpg,other.jpg,easy\n")
    with pytest.raises(EngineError, match="line 2: 'other.jpg' is not in the gallery list"):
        convert.convert_test(*args)
    (tmp_path / "labels.csv").write_text("query,image,label\nq.jpg,g.jpg,maybe\n")
    with pytest.raises(EngineError, match="label must be one of positive, easy, hard, junk"):
        convert.convert_test(*args)


# ---------------------------------------------------------------- pickles as published: numpy inside, old formats

def revisitop_gnd():
    """Shaped like the official gnd_roxford5k.pkl: numpy arrays for bbx and the label lists."""
    return {"imlist": ["all_souls_000013", "ashmolean_000000", "balliol_000051"], "qimlist": ["all_souls_000006"],
            "gnd": [{"bbx": np.array([136.5, 34.1, 648.5, 955.7]), "easy": np.array([0, 2], np.int64),
                     "hard": np.array([], np.int64), "junk": np.array([1], np.int64)}]}


def expect_loaded(cfg):
    assert cfg["imlist"][1] == "ashmolean_000000" and cfg["qimlist"] == ["all_souls_000006"]
    assert cfg["gnd"][0] == {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": [0, 2], "hard": [], "junk": [1]}
    assert all(type(i) is int for i in cfg["gnd"][0]["easy"]) and type(cfg["gnd"][0]["bbx"][0]) is float


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_gnd_with_numpy_arrays_loads_in_every_protocol(tmp_path, protocol):
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(revisitop_gnd(), protocol=protocol))
    expect_loaded(load_gnd(path))


def as_numpy1(data: bytes) -> bytes:
    """The same pickle as numpy 1.x writes it: `numpy.core.*` where numpy 2 writes `numpy._core.*`."""
    if data[1] < 4:  # GLOBAL opcodes: names as newline-ended text
        return data.replace(b"numpy._core.", b"numpy.core.")
    out = data
    for name in (b"numpy._core.multiarray", b"numpy._core.numeric"):  # SHORT_BINUNICODE: a length byte, then the name
        new = name.replace(b"._core.", b".core.")
        out = out.replace(b"\x8c" + bytes([len(name)]) + name, b"\x8c" + bytes([len(new)]) + new)
    assert out[2] == 0x95 and struct.unpack("<Q", data[3:11])[0] == len(data) - 11  # one frame: fix its length
    return out[:3] + struct.pack("<Q", len(out) - 11) + out[11:]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy1_names_load(tmp_path, protocol):
    data = as_numpy1(pickle.dumps({"a": np.arange(5, dtype=np.int64), "s": np.float64(2.5), "t": np.zeros((2, 3), np.float32).T},
                                  protocol=protocol))
    assert b"numpy.core." in data and b"numpy._core." not in data
    (tmp_path / "old.pkl").write_bytes(data)
    got = read_pickle(tmp_path / "old.pkl")
    assert got["a"].tolist() == [0, 1, 2, 3, 4] and got["a"].dtype == np.int64
    assert got["s"] == 2.5 and isinstance(got["s"], np.float64)
    assert got["t"].shape == (3, 2) and got["t"].dtype == np.float32


def py2_string(b: bytes) -> bytes:
    """Python 2's SHORT_BINSTRING / BINSTRING: how a py2 `str` (names, array bytes) is pickled."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def py2_array(a: np.ndarray) -> bytes:
    """What Python 2.7 + numpy 1.x pickled (protocol 2) for a 1-d array: _reconstruct, dtype with state, py2 str data."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + py2_string(b"b") + b"\x87R("
            + b"K\x01K" + bytes([len(a)]) + b"\x85cnumpy\ndtype\n" + py2_string(a.dtype.str[1:].encode())
            + b"K\x00K\x01\x87R(K\x03" + py2_string(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            + py2_string(a.tobytes()) + b"tb")


def test_python2_era_gnd_loads(tmp_path):
    g = revisitop_gnd()
    entry = g["gnd"][0]
    data = (b"\x80\x02}(" + py2_string(b"imlist") + b"](" + b"".join(py2_string(n.encode()) for n in g["imlist"]) + b"e"
            + py2_string(b"qimlist") + b"]" + py2_string(g["qimlist"][0].encode()) + b"a"
            + py2_string(b"gnd") + b"]}(" + b"".join(py2_string(k.encode()) + py2_array(entry[k]) for k in entry) + b"ua"
            + b"u.")
    (tmp_path / "gnd.pkl").write_bytes(data)
    expect_loaded(load_gnd(tmp_path / "gnd.pkl"))
    with warnings.catch_warnings():  # the standard unpickler reads the same (numpy 2 warns about numpy.core)
        warnings.simplefilter("ignore")
        assert pickle.loads(data, encoding="latin1")["gnd"][0]["easy"].tolist() == [0, 2]


def test_sfm_db_with_numpy_arrays_loads(sfm_root):
    split = {"cids": CIDS, "cluster": np.array([7, 7, 3, 3, 9]), "qidxs": np.array([0, 2], np.int32),
             "pidxs": np.array([1, 3], np.uint8), "bbxs": [None] * 5}
    for protocol in (2, 5):
        write_pickle_as(sfm_root / "dbs" / "np.pkl", {"train": split}, protocol)
        ts = load_quiet(sfm_root / "dbs" / "np.pkl")
        assert ts.cluster.dtype == np.int64 and ts.cluster.tolist() == [7, 7, 3, 3, 9] and ts.pidxs.tolist() == [1, 3]


def write_pickle_as(path, obj, protocol):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def test_write_pickle_round_trip_is_atomic_and_deterministic(tmp_path, monkeypatch):
    obj = {"imlist": ["a"], "gnd": [{"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [0]}], "set": {1, 2}}
    write_pickle(obj, tmp_path / "sub" / "x.pkl")
    first = (tmp_path / "sub" / "x.pkl").read_bytes()
    write_pickle(obj, tmp_path / "sub" / "y.pkl")
    assert read_pickle(tmp_path / "sub" / "x.pkl") == obj and (tmp_path / "sub" / "y.pkl").read_bytes() == first

    def broken(*_a, **_k):
        raise OSError("disk gone")
    monkeypatch.setattr(pickle, "dump", broken)
    with pytest.raises(OSError):
        write_pickle({"other": 1}, tmp_path / "sub" / "x.pkl")
    assert (tmp_path / "sub" / "x.pkl").read_bytes() == first and sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.pkl", "y.pkl"]


# ---------------------------------------------------------------- ground truth of the wrong types

GOOD_ENTRY = {"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [0], "hard": [1], "junk": []}


@pytest.mark.parametrize("change, message", [
    ({"imlist": "a"}, "'imlist' must be a list of names, not str 'a'"),
    ({"qimlist": [b"q"]}, r"'qimlist'\[0\] must be a non-empty string, not bytes b'q'"),
    ({"imlist": ["a", 3]}, r"'imlist'\[1\] must be a non-empty string, not int 3"),
    ({"imlist": np.array([1, 2])}, "'imlist' must be a list of names, not ndarray"),
    ({"gnd": {"q": GOOD_ENTRY}}, "'gnd' must be a list of dicts, one per query, not dict"),
    ({"gnd": [GOOD_ENTRY, GOOD_ENTRY]}, "'gnd' has 2 entries for 1 queries"),
    ({"gnd": [[0, 1]]}, r"gnd\[0\] must be a dict, not list"),
    ({"gnd": [{**GOOD_ENTRY, "easy": ["0"]}]}, r"gnd\[0\]\['easy'\]\[0\] must be an integer index, not str '0'"),
    ({"gnd": [{**GOOD_ENTRY, "easy": [0.0]}]}, r"gnd\[0\]\['easy'\]\[0\] must be an integer index, not float 0.0"),
    ({"gnd": [{**GOOD_ENTRY, "hard": [True]}]}, r"\['hard'\]\[0\] must be an integer index, not bool"),
    ({"gnd": [{**GOOD_ENTRY, "junk": [2]}]}, r"gnd\[0\]\['junk'\]\[0\] = 2 is outside the 2-image gallery"),
    ({"gnd": [{**GOOD_ENTRY, "junk": [-1]}]}, r"\['junk'\]\[0\] = -1 is outside"),
    ({"gnd": [{**GOOD_ENTRY, "easy": 0}]}, r"\['easy'\] must be a list of integer indices, not int 0"),
    ({"gnd": [{**GOOD_ENTRY, "easy": np.array([0.0])}]}, r"\['easy'\] must be a flat list of integer indices, got a float64 array"),
    ({"gnd": [{**GOOD_ENTRY, "easy": np.array([[0]])}]}, r"got a int64 array of shape \(1, 1\)"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": [1, 2, 3]}]}, r"gnd\[0\]\['bbx'\] must be 4 finite numbers"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": ["1", 2, 3, 4]}]}, r"\['bbx'\] must be 4 finite numbers .* got \['1', 2, 3, 4\]"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": [0, 0, float("nan"), 4]}]}, r"\['bbx'\] must be 4 finite numbers"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": [5, 0, 1, 4]}]}, r"\['bbx'\] must be .* with x1 < x2"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": np.zeros((2, 2))}]}, r"\['bbx'\] must be 4 finite numbers"),
    ({"gnd": [{**GOOD_ENTRY, "bbx": "0 0 5 5"}]}, r"\['bbx'\] must be 4 finite numbers"),
])
def test_gnd_of_the_wrong_types_is_named(tmp_path, change, message):
    path = write(tmp_path / "gnd.pkl", {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [GOOD_ENTRY], **change})
    with pytest.raises(EngineError, match=message) as err:
        load_gnd(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_gnd_accepts_numpy_scalars_and_missing_labels(tmp_path):
    entry = {"bbx": (np.float32(1), np.int64(2), 30, 40.5), "easy": [np.int64(1)]}
    cfg = load_gnd(write(tmp_path / "gnd.pkl", {"imlist": np.array(["a", "b"]), "qimlist": ("q",), "gnd": [entry]}))
    assert cfg["imlist"] == ["a", "b"] and cfg["qimlist"] == ["q"]
    assert cfg["gnd"][0] == {"bbx": [1.0, 2.0, 30.0, 40.5], "easy": [1], "hard": [], "junk": []}
