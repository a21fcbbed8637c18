"""The `engine` command end to end on a tiny benchmark: encode, search, eval, and the bad-input paths."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

SIDE = "96"


@pytest.fixture(scope="module")
def encoded(tiny_bench, tmp_path_factory):
    """Teacher gallery store, teacher and untrained-student query vectors (encoded once for the module)."""
    import sys

    from engine.cli import main

    work = tmp_path_factory.mktemp("cli")
    gnd = tiny_bench / "gnd.pkl"

    def run(*args):
        sys.argv = ["engine", *map(str, args)]
        try:
            main()
        except SystemExit as e:
            assert not e.code, args

    run("encode", "--model", "effnet-lite2-gem", "--gnd", gnd, "--out", work / "t.store", "--max-side", SIDE, "--shard-rows", 5, "--workers", 0)
    run("encode", "--model", "effnet-lite2-gem", "--gnd", gnd, "--split", "query", "--out", work / "qt.npy", "--max-side", SIDE, "--workers", 0)
    run("encode", "--student", "mobilenetv2", "--target", work / "t.store", "--gnd", gnd, "--split", "query",
        "--out", work / "qs.npy", "--max-side", SIDE, "--workers", 0)
    return work, gnd


def test_encode_search_eval_json(encoded, run_cli):
    work, gnd = encoded
    manifest = json.loads((work / "t.store" / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) == 3 and manifest["complete"]
    code, _, err = run_cli("search", work / "t.store", "--queries", work / "qt.npy", "-k", 100, "--out", work / "r.npz")
    assert code == 0, err
    res = np.load(work / "r.npz")
    assert res["ids"].shape == (3, 12) and res["ids"].dtype == np.int64 and res["scores"].dtype == np.float32
    assert (np.diff(res["scores"], axis=1) <= 0).all()  # best first; k > gallery returns the whole gallery
    code, out, err = run_cli("eval", "--gnd", gnd, "--ranks", work / "r.npz", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"easy", "medium", "hard"}
    assert set(metrics["medium"]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    assert metrics["easy"]["mAP"] > 80  # a pretrained teacher finds the big crops of the same photograph


def test_untrained_student_from_a_store_starts_at_the_classifier_bridge(encoded, run_cli):
    # `--student ARCH --target STORE` finds the store's registry teacher and bridges through the ImageNet classifiers:
    # the student's query vectors are nearer the teacher's vector of the same query than any other query's.
    work, gnd = encoded
    meta = json.loads((work / "qs.npy.json").read_text())
    manifest = json.loads((work / "t.store" / "manifest.json").read_text())
    assert meta["space"] == manifest["space"] and meta["encoder"]["head_init"] == "imagenet-bridge"
    qs, qt = np.load(work / "qs.npy"), np.load(work / "qt.npy")
    assert ((qs @ qt.T).argmax(axis=1) == np.arange(len(qt))).all()
    assert run_cli("search", work / "t.store", "--queries", work / "qs.npy", "-k", 12, "--out", work / "qs.npz")[0] == 0
    code, out, _ = run_cli("eval", "--gnd", gnd, "--ranks", work / "qs.npz", "--json")
    assert code == 0 and 0 < json.loads(out)["medium"]["mAP"] <= 100


def test_eval_accepts_revisitop_ranks_npy(encoded, run_cli):
    from engine.evaluate import evaluate_revisited

    work, gnd = encoded
    ranks = np.tile(np.arange(12)[:, None], (1, 3))
    np.save(work / "ranks.npy", ranks)
    code, out, _ = run_cli("eval", "--gnd", gnd, "--ranks", work / "ranks.npy", "--json")
    assert code == 0
    with open(gnd, "rb") as f:
        expected = evaluate_revisited(ranks, pickle.load(f)["gnd"])
    got = json.loads(out)
    for protocol in expected:
        assert got[protocol] == pytest.approx(expected[protocol], abs=1e-9)


def test_bad_inputs_give_one_line_errors(encoded, run_cli, tmp_path):
    work, gnd = encoded
    np.save(tmp_path / "q64.npy", np.ones((2, 64), np.float32))
    code, _, err = run_cli("search", work / "t.store", "--queries", tmp_path / "q64.npy", "-k", 5, "--out", tmp_path / "x.npz")
    assert code != 0 and "D = 64" in err and err.count("\n") == 1
    assert not (tmp_path / "x.npz").exists()

    q = np.load(work / "qt.npy")
    np.save(tmp_path / "qother.npy", q)
    (tmp_path / "qother.npy.json").write_text(json.dumps({"space": "someone-else:123", "dim": q.shape[1]}))
    code, _, err = run_cli("search", work / "t.store", "--queries", tmp_path / "qother.npy", "-k", 5, "--out", tmp_path / "x.npz")
    assert code != 0 and "space" in err

    with open(tmp_path / "bad_gnd.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q1", "q2"], "gnd": [{"easy": [0]}]}, f)
    code, _, err = run_cli("eval", "--gnd", tmp_path / "bad_gnd.pkl", "--ranks", work / "ranks.npy")
    assert code != 0 and "bad_gnd.pkl" in err and "2 queries" in err

    code, _, err = run_cli("eval", "--gnd", gnd, "--ranks", tmp_path / "nothing.npy")
    assert code != 0 and "nothing.npy" in err

    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--images", tmp_path / "nowhere", "--out", tmp_path / "s")
    assert code != 0 and "nowhere" in err and not (tmp_path / "s").exists()


def test_corrupt_image_is_named_then_skipped_then_resumed(tmp_path, run_cli):
    from skimage import data

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    photo = data.astronaut()
    for i in range(6):
        Image.fromarray(np.roll(photo, 40 * i, axis=1)).save(imgs / f"im{i}.jpg")
    (imgs / "im4.jpg").write_bytes(b"garbage")
    args = ["encode", "--model", "effnet-lite2-gem", "--images", imgs, "--out", tmp_path / "s", "--max-side", 64,
            "--shard-rows", 2, "--workers", 0, "--batch-size", 1]
    code, _, err = run_cli(*args)
    assert code != 0 and "im4.jpg" in err and "--skip-bad" in err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2  # the two whole shards before the bad image stay
    first = (tmp_path / "s" / "float32" / "shard-00000.npy").stat().st_mtime_ns

    code, _, err = run_cli(*args, "--skip-bad")
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 5
    assert (tmp_path / "s" / "float32" / "shard-00000.npy").stat().st_mtime_ns == first  # resumed, not redone
    skipped = [s for sh in manifest["shards"] for s in sh["skipped"]]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("im4.jpg")


def test_compressed_copy_with_rescoring_gives_the_exact_answer(encoded, run_cli, tmp_path):
    import shutil

    work, _ = encoded
    store = tmp_path / "t.store"
    shutil.copytree(work / "t.store", store)
    assert run_cli("store", "convert", store, "--dtype", "int8")[0] == 0
    outs = {}
    for scan, rescore in (("float32", 0), ("int8", 4)):
        code, _, err = run_cli("search", store, "--queries", work / "qt.npy", "-k", 5, "--out", tmp_path / f"{scan}.npz",
                               "--scan", scan, "--rescore", rescore)
        assert code == 0, err
        outs[scan] = np.load(tmp_path / f"{scan}.npz")
    np.testing.assert_array_equal(outs["int8"]["ids"], outs["float32"]["ids"])
    np.testing.assert_allclose(outs["int8"]["scores"], outs["float32"]["scores"], rtol=1e-6)


def test_a_store_of_other_weights_in_the_same_space_is_not_resumed_into(encoded, run_cli, tmp_path):
    import torch

    from engine.models import build_student, save_checkpoint
    from engine.store import read_manifest

    work, gnd = encoded
    m = read_manifest(work / "t.store")
    other = build_student("mobilenetv2", m["dim"], m["space"])
    with torch.no_grad():
        other.head.p.fill_(2.0)  # same name, same space, other weights
    save_checkpoint(other, tmp_path / "other.safetensors")
    common = ["--gnd", gnd, "--out", tmp_path / "s.store", "--max-side", SIDE, "--workers", 0]
    assert run_cli("encode", "--student", "mobilenetv2", "--target", work / "t.store", *common)[0] == 0
    code, _, err = run_cli("encode", "--model", tmp_path / "other.safetensors", *common)
    assert code != 0 and "source_key" in err
