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
    assert (np.diff(res["scores"], axis=1) <= 0).all()  # best first; k > gallery returns the whole gallery, and says so
    assert "-k 100 is more than the store's 12 rows" in err
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
    shard = tmp_path / "s" / "float32" / "shard-00000.npy"
    first = (shard.stat().st_ino, shard.read_bytes())  # every write is a new file renamed into place: a new inode

    code, _, err = run_cli(*args, "--skip-bad")
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 5
    assert (shard.stat().st_ino, shard.read_bytes()) == first  # resumed, not redone
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


# ---------------------------------------------------------------- the command line's own surface

from engine.cli import app  # noqa: E402
from engine.cli.options import all_params as params_of  # noqa: E402


def all_params():
    return params_of(app)


def command_params(path: str) -> dict:
    return {p.name: p for cmd, p in all_params() if cmd == path}


def test_every_option_and_argument_has_help():
    missing = [f"{cmd} {p.name}" for cmd, p in all_params() if p.name != "help" and not (getattr(p, "help", "") or "").strip()]
    assert not missing, missing
    assert len(all_params()) > 100  # the walk reached every subcommand's options


def test_option_defaults_are_the_library_defaults():
    import dataclasses
    import inspect

    from engine import cli, export, images, store
    from engine.cli.options import parse_scales
    from engine.cluster import ShardGroups
    from engine.datasets.views import build_views
    from engine.encode import EncodeOptions
    from training.trainer import TrainConfig

    checked = 0
    renamed = {"runner": "backend"}  # the command's name -> the dataclass field
    for cmd, cls in (("engine encode", EncodeOptions), ("engine whiten", EncodeOptions), ("engine train", TrainConfig),
                     ("engine demo", TrainConfig)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, p in command_params(cmd).items():
            field = renamed.get(name, name)
            if field not in fields or name == "workers" or (cmd, name) == ("engine demo", "student"):  # the demo's own
                continue
            default = parse_scales(p.default) if name in ("scales", "val_scales") else p.default
            assert default == fields[field], (cmd, name)
            checked += 1
    assert checked >= 25
    # --workers -1 is the command's "half the cores", resolved at run time (the dataclasses take a count)
    assert all(p.default == cli.AUTO_WORKERS for cmd, p in all_params() if p.name == "workers")
    assert (cli.MAX_SIDE, cli.MIN_SIDE, cli.SHARD_ROWS) == (images.DEFAULT_MAX_SIDE, images.MIN_SIDE, store.DEFAULT_SHARD_ROWS)
    assert all(p.default == cli.SHARD_ROWS for cmd, p in all_params() if p.name == "shard_rows")
    groups = inspect.signature(ShardGroups).parameters
    serve = command_params("engine serve")
    assert (serve["groups"].default, serve["replicas"].default) == (groups["groups"].default, groups["replicas"].default)
    ex = command_params("engine export")
    assert (ex["min_batch"].default, ex["min_side"].default) == export.TRT_MIN
    assert (ex["opt_batch"].default, ex["opt_side"].default) == export.TRT_OPT
    assert (ex["max_batch"].default, ex["max_side"].default) == export.TRT_MAX
    assert ex["opset"].default == export.DEFAULT_OPSET
    views = command_params("engine data views")
    sig = inspect.signature(build_views).parameters
    for name, arg in (("difficulty", "difficulty"), ("seed", "seed"), ("train_views", "n_train"), ("train_fraction", "train_fraction")):
        assert views[name].default == sig[arg].default, name


def test_one_flag_one_meaning():
    """--max-side is the resize side wherever it appears (export's profile bounds are --profile-*), --student an
    architecture, --backend only the search backend (encoding's is --runner)."""
    flags: dict[str, set] = {}
    for cmd, p in all_params():
        for opt in p.opts:
            flags.setdefault(opt, set()).add((p.default, p.help))
    for flag in ("--max-side", "--workers", "--shard-rows", "--scales"):
        assert len({d for d, _ in flags[flag]}) == 1, flag
    assert len(flags["--backend"]) == 1 and len(flags["--runner"]) == 1
    assert all("architecture" in h for _, h in flags["--student"])


@pytest.mark.parametrize("args, message", [
    (["encode", "--model", "effnet-lite2-gem", "--images", ".", "--out", "s", "--max-side", "0"], "--max-side"),
    (["encode", "--model", "effnet-lite2-gem", "--images", ".", "--out", "s", "--dtype", "float64"], "float64"),
    (["encode", "--model", "effnet-lite2-gem", "--images", ".", "--out", "s", "--scales", "1,nan"], "--scales"),
    (["search", "s", "--queries", "q.npy", "--out", "r.npz", "-k", "0"], "-k"),
    (["search", "s", "--queries", "q.npy", "--out", "r.npz", "--backend", "onnxruntime"], "onnxruntime"),
    (["train", "--out", "r", "--teacher-store", "t", "--train-set", "db.pkl", "--lr", "nan"], "--lr"),
    (["train", "--out", "r", "--teacher-store", "t", "--train-set", "db.pkl", "--val-gnd", "g.pkl"], "--val-store"),
    (["train", "--out", "r", "--teacher-store", "t", "--train-set", "db.pkl", "--student", "vgg19"], "unknown student or teacher 'vgg19'"),
    (["train", "--out", "r", "--teacher-store", "t", "--train-set", "db.pkl", "--loss", "nope"], "unknown loss 'nope'"),
    (["data", "views", "--out", "v", "--train-fraction", "1.5"], "--train-fraction"),
    (["export", "--model", "m", "--out", "m.onnx", "--profile-min-side", "64", "--profile-opt-side", "48"], "profile"),
])
def test_bad_values_are_usage_errors_before_any_work(run_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*args)
    assert code == 2 and message in err and not out
    assert not list(tmp_path.iterdir())  # nothing written


def store_from(run_cli, tmp_path, n=10, d=8, shard_rows=4):
    vecs = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    np.save(tmp_path / "v.npy", vecs)
    code, out, err = run_cli("store", "import", tmp_path / "v.npy", "--out", tmp_path / "s", "--shard-rows", shard_rows)
    assert code == 0, err
    return vecs, tmp_path / "s"


def test_store_import_then_info_then_verify_catches_an_altered_shard(run_cli, tmp_path):
    from engine.store import open_store

    vecs, store = store_from(run_cli, tmp_path)
    np.testing.assert_array_equal(open_store(store).vectors(), vecs)  # the vectors, whole and in order
    code, out, err = run_cli("store", "info", store, "--verify")
    assert code == 0, err
    info = json.loads(out)
    assert info["count"] == 10 and info["dim"] == 8 and info["shards"] == 3 and info["complete"] and info["verified"]
    assert info["copies"] == ["float32"] and info["space"].startswith("imported:") and info["skipped"] == 0
    assert info["generation"] == 1 and info["deleted"] == 0  # one published write, nothing removed
    (tmp_path / "gone.txt").write_text("3\n7\n")
    assert run_cli("store", "remove", store, "--names", tmp_path / "gone.txt")[0] == 0
    info = json.loads(run_cli("store", "info", store)[1])
    assert info["generation"] == 2 and info["deleted"] == 2 and info["count"] == 10  # ids are kept

    shard = store / "float32" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: only the checksum tells
    shard.write_bytes(bytes(data))
    assert run_cli("store", "info", store)[0] == 0  # without --verify only sizes and headers are read
    code, out, err = run_cli("store", "info", store, "--verify")
    assert code == 1 and "shard-00001.npy" in err and err.count("\n") == 1 and not out


def test_models_lists_every_registry_entry(run_cli):
    from engine.models import describe_registry

    code, out, err = run_cli("models")
    assert code == 0, err
    rows = describe_registry()
    assert rows
    for row in rows:
        assert row["name"] in out


@pytest.mark.parametrize("ids, message", [
    (np.array([[0, 1, 0], [2, 1, 0], [1, 2, 0]]), "lists gallery id 0 more than once"),
    (np.array([[0.0, 1.5, 2.0], [2, 1, 0], [1, 2, 0]]), "must be integers, got float64"),
    (np.array([[0, 1, -1], [2, 1, 0], [1, 2, 0]]), "must be >= 0"),
])
@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_eval_refuses_rankings_it_would_miscount(tiny_bench, run_cli, tmp_path, ids, message, fmt):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "npz":
        np.savez(path, ids=ids, scores=np.zeros(ids.shape, np.float32))
    else:
        np.save(path, ids.T)
    code, out, err = run_cli("eval", "--gnd", tiny_bench / "gnd.pkl", "--ranks", path)
    assert code == 1 and message in err and str(path) in err and err.count("\n") == 1 and not out


def test_an_output_path_of_the_wrong_kind_is_one_line_and_leaves_nothing(run_cli, tmp_path, tiny_bench):
    _, store = store_from(run_cli, tmp_path)
    np.save(tmp_path / "q.npy", np.ones((2, 8), np.float32))
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("keep me")
    cases = [
        ("search", store, "--queries", tmp_path / "q.npy", "--out", tmp_path / "taken"),
        ("search", store, "--queries", tmp_path / "q.npy", "--out", tmp_path / "file" / "r.npz"),
        ("report", "--gnd", tiny_bench / "gnd.pkl", "--results", tmp_path / "r.npz", "--out", tmp_path / "file"),
        ("data", "views", "--out", tmp_path / "file"),
        ("data", "convert-test", "g.csv", "q.csv", "l.csv", "--out", tmp_path / "taken"),
        ("store", "import", tmp_path / "q.npy", "--out", tmp_path / "file"),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in cases:
        code, out, err = run_cli(*args)
        assert code == 1 and err.count("\n") == 1 and ("taken" in err or "file" in err), (args, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no .tmp, nothing half-written
    assert (tmp_path / "file").read_text() == "keep me"


def test_search_says_when_k_is_cut_to_the_gallery(run_cli, tmp_path):
    _, store = store_from(run_cli, tmp_path)
    np.save(tmp_path / "q.npy", np.ones((2, 8), np.float32))
    code, out, err = run_cli("search", store, "--queries", tmp_path / "q.npy", "-k", 50, "--out", tmp_path / "r.npz")
    assert code == 0 and "-k 50" in err and "10 results per query" in err and not out
    from engine.results import load_results

    ids, scores = load_results(tmp_path / "r.npz")
    assert ids.shape == scores.shape == (2, 10)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(run_cli, tmp_path):
    _, store = store_from(run_cli, tmp_path)
    np.save(tmp_path / "q.npy", np.ones((2, 8), np.float32))
    for args in (("search", store, "--queries", tmp_path / "q.npy", "--out", tmp_path / "r.npz", "--backend", "torch", "--device", "cuda"),
                 ("encode", "--model", "effnet-lite2-gem", "--images", tmp_path, "--out", tmp_path / "e", "--device", "cuda:1")):
        code, _, err = run_cli(*args)
        assert code == 1 and "no CUDA device" in err and err.count("\n") == 1
    assert not (tmp_path / "r.npz").exists() and not (tmp_path / "e").exists()


def test_internal_errors_and_user_os_errors(run_cli, monkeypatch, tmp_path):
    import engine.store
    from engine.errors import EXIT_BUG, EXIT_INPUT

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine.store, "open_store", broken)
    code, out, err = run_cli("store", "info", tmp_path)
    assert code == EXIT_BUG and err.startswith("internal error: ZeroDivisionError: a bug") and err.count("\n") == 1
    code, out, err = run_cli("--debug", "store", "info", tmp_path)
    assert code == EXIT_BUG and "Traceback" in err and 'raise ZeroDivisionError("a bug")' in err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "s" / "manifest.json"))

    monkeypatch.setattr(engine.store, "open_store", denied)
    code, out, err = run_cli("store", "info", tmp_path / "s")
    assert code == EXIT_INPUT and err == f"error: {tmp_path / 's' / 'manifest.json'}: permission denied\n"


def test_the_value_checks_every_layer_shares():
    from engine.checks import check_float, check_int
    from engine.errors import EngineError

    assert check_int(np.int64(3), "k") == 3 and check_int(0, "threads", minimum=0) == 0
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(EngineError, match=r"^k must be a positive integer, got"):
            check_int(bad, "k")
    with pytest.raises(EngineError, match=r"threads must be an integer >= 0 \(0 = all cores\), got -1"):
        check_int(-1, "threads", minimum=0, note="0 = all cores")
    assert check_float(np.float32(0.5), "f", 0, 1, open_min=True) == 0.5
    for bad in (float("nan"), float("inf"), -float("inf"), 0.0, 1.5, False, "0.5"):
        with pytest.raises(EngineError, match=r"^f must be a finite number in \(0, 1\], got"):
            check_float(bad, "f", 0, 1, open_min=True)


def test_an_interrupt_is_exit_130_with_one_line(run_cli, monkeypatch, tmp_path):
    import engine.store
    from engine.errors import EXIT_INTERRUPTED

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.store, "open_store", interrupted)
    code, out, err = run_cli("store", "info", tmp_path)
    assert code == EXIT_INTERRUPTED and err == "interrupted: rerun the same command to resume\n"


def test_the_command_starts_without_torch():
    """Defaults are written out and the costly choice lists read on use, so `engine --help` does not load torch."""
    import subprocess
    import sys

    code = "import sys, engine.cli; sys.exit(sorted({'torch', 'matplotlib', 'training'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
