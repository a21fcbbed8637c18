"""`engine train` end to end on a tiny training set: every loss family runs, learns, checkpoints and resumes."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import EXIT_INPUT, EngineError
from engine.models import load_checkpoint
from training.run import run_training
from training.trainer import TrainConfig

SIDE = 64


@pytest.fixture(scope="module")
def teacher_store(tiny_train, tmp_path_factory):
    from engine.cli import main

    out = tmp_path_factory.mktemp("train") / "teacher.store"
    sys.argv = ["engine", "encode", "--model", "effnet-lite2-gem", "--train-set", str(tiny_train / "train" / "db.pkl"),
                "--out", str(out), "--max-side", str(SIDE), "--workers", "0"]
    try:
        main()
    except SystemExit as e:
        assert not e.code
    return out


def train_args(tiny_train, teacher_store, out, *extra):
    return ["train", "--out", out, "--teacher-store", teacher_store, "--train-set", tiny_train / "train" / "db.pkl",
            "--max-side", SIDE, "--workers", 0, "--neg-num", 2, "--batch-size", 2, *extra]


def test_regression_lowers_its_loss_and_resumes(tiny_train, teacher_store, tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, out, "--loss", "regression", "--epochs", 2, "--lr", "1e-3"))
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, out, "--loss", "regression", "--epochs", 4, "--lr", "1e-3"))
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # resumed at epoch 3, not restarted
    assert log[-1]["loss"] < log[0]["loss"]
    student = load_checkpoint(out / "last.safetensors")
    assert student.config["epoch"] == 4 and student.config["train"]["loss"] == "regression"
    assert student.space == json.loads((teacher_store / "manifest.json").read_text())["space"]


@pytest.fixture(scope="module")
def start(teacher_store, tmp_path_factory):
    """A checkpoint of the untrained default student, as every run of it starts (built once: the bridge takes seconds)."""
    from engine.models import build_student, registry_teacher_of, save_checkpoint
    from engine.store import open_store

    store = open_store(teacher_store)
    student = build_student("mobilenetv2", store.dim, store.space, bridge_to=registry_teacher_of(store.space))
    return save_checkpoint(student, tmp_path_factory.mktemp("start") / "untrained.safetensors")


@pytest.fixture(scope="module")
def untrained(start):
    """The state dict every run of the default student starts from."""
    return load_checkpoint(start).state_dict()


@pytest.mark.parametrize("loss,mode,extra", [("contrastive", "asym", ()), ("contrastive+", "asym", ()),
                                             ("triplet", "sym", ("--margin", 1.0)),  # 0.1: every triplet satisfied
                                             ("multi-similarity", "asym", ()), ("rkd", "asym", ()), ("csd", "asym", ())])
def test_each_loss_family_trains_an_epoch(tiny_train, teacher_store, tmp_path, run_cli, untrained, loss, mode, extra):
    # No weight decay: under Adam it alone would move every weight, whatever the loss did.
    code, out, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "run", "--loss", loss, "--mode", mode,
                                         "--epochs", 1, "--query-size", 4, "--pool-size", 16, "--lr", "1e-3",
                                         "--weight-decay", 0, *extra))
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1]) if out.strip() else json.loads(err.strip().splitlines()[-1])
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    trained = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert trained.config["train"]["loss"] == loss and trained.config["epoch"] == 1
    moved = [name for name, w in trained.state_dict().items() if w.is_floating_point() and not torch.equal(w, untrained[name])]
    assert "head.project.weight" in moved and any(name.startswith("trunk.") for name in moved)  # the loss reached both


# ---------------------------------------------------------------- bad values: one clear line, before any work
BAD_VALUES = [
    (("--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    (("--lr", "inf"), "--lr must be a finite number > 0, got inf"),
    (("--lr", "0"), "--lr must be a finite number > 0, got 0.0"),
    (("--lr", "-1e-4"), "--lr must be a finite number > 0, got -0.0001"),
    (("--lr-decay", "nan"), "--lr-decay must be a finite number >= 0, got nan"),
    (("--lr-decay", "-0.1"), "--lr-decay must be a finite number >= 0, got -0.1"),
    (("--weight-decay", "nan"), "--weight-decay must be a finite number >= 0, got nan"),
    (("--weight-decay", "-1"), "--weight-decay must be a finite number >= 0, got -1.0"),
    (("--epochs", "0"), "--epochs must be an integer >= 1, got 0"),
    (("--epochs", "-3"), "--epochs must be an integer >= 1, got -3"),
    (("--batch-size", "0"), "--batch-size must be an integer >= 1, got 0"),
    (("--images-per-epoch", "0"), "--images-per-epoch must be an integer >= 1, got 0"),
    (("--query-size", "-1"), "--query-size must be an integer >= 1, got -1"),
    (("--pool-size", "0"), "--pool-size must be an integer >= 1, got 0"),
    (("--neg-num", "0"), "--neg-num must be an integer >= 1, got 0"),
    (("--max-side", "0"), "--max-side must be an integer >= 1, got 0"),
    (("--val-every", "0"), "--val-every must be an integer >= 1, got 0"),
    (("--seed", "-1"), "--seed must be an integer >= 0, got -1"),
    (("--loss", "contrastive", "--margin", "nan"), "--margin must be a finite number >= 0, got nan"),
    (("--loss", "triplet", "--margin", "-0.5"), "--margin must be a finite number >= 0, got -0.5"),
    (("--loss", "regression", "--margin", "0.5"), "loss regression takes no margin"),
    (("--loss", "multi-similarity", "--margin", "0.5"), "loss multi-similarity takes no margin"),
    (("--loss", "nope"), "unknown loss 'nope'"),
    (("--mode", "both"), "--mode must be one of asym, sym, got 'both'"),
    (("--negatives", "easy"), "--negatives must be one of hard, random, got 'easy'"),
    (("--freeze", "all"), "--freeze must be one of bn, trunk, got 'all'"),
    (("--loss", "regression", "--mode", "sym"), "regression transfers the teacher's knowledge: it has no symmetric form"),
    (("--val-gnd", "v/gnd.pkl"), "v/gnd.pkl: --val-gnd needs --val-store"),
    (("--val-store", "v.store"), "v.store: --val-store needs --val-gnd"),
]


def library_arguments(extra: tuple[str, ...]) -> tuple[dict, dict]:
    """--flag value pairs -> (TrainConfig fields, run_training's path arguments), each value of its field's type."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    fields, paths = {}, {}
    for flag, value in zip(extra[::2], extra[1::2]):
        name = flag[2:].replace("-", "_")
        if name in ("val_gnd", "val_store"):
            paths[name] = Path(value)
        else:
            default = defaults[name]
            fields[name] = value if isinstance(default, str) else (int(value) if isinstance(default, int) else float(value))
    return fields, paths


@pytest.mark.parametrize("extra,message", BAD_VALUES, ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_bad_values_are_refused_before_any_work(tiny_train, tmp_path, extra, message):
    fields, paths = library_arguments(extra)
    # The teacher store does not exist: a check that ran after loading the data would report it instead.
    with pytest.raises(EngineError) as e:
        run_training(TrainConfig(**fields), tmp_path / "run", tmp_path / "missing.store", tiny_train / "train" / "db.pkl",
                     **paths)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra", [e for e, _ in BAD_VALUES], ids=[" ".join(e) for e, _ in BAD_VALUES])
def test_the_command_refuses_them_too(tiny_train, tmp_path, run_cli, extra):
    """At the edge (a usage error, exit 2) or from the library (one line, exit 1): never any work."""
    code, _, err = run_cli(*train_args(tiny_train, tmp_path / "missing.store", tmp_path / "run", *extra))
    assert code == 2 or (code == EXIT_INPUT and len(err.strip().splitlines()) == 1), (code, err)
    assert not (tmp_path / "run").exists()


def test_a_missing_teacher_store_is_named(tiny_train, tmp_path, run_cli):
    code, _, err = run_cli(*train_args(tiny_train, tmp_path / "missing.store", tmp_path / "r"))
    assert code == EXIT_INPUT and "missing.store" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- in-process runs: centring, best-model choice
def trainer_for(tiny_train, teacher_store, start, out, val=None, **options):
    """A Trainer of the untrained student over the tiny training set: frozen trunk (its maps computed once),
    16-image epochs."""
    from engine.store import open_store
    from training.data import load_train_data
    from training.trainer import Trainer

    cfg = TrainConfig(**{"loss": "regression", "epochs": 3, "lr": 1e-3, "batch_size": 2, "images_per_epoch": 16,
                         "max_side": SIDE, "workers": 0, "freeze": "trunk", **options})
    data = load_train_data(tiny_train / "train" / "db.pkl", open_store(teacher_store))
    return Trainer(cfg, data, out, val, progress=False, init=start)


class Spy:
    """Wraps a loss, recording the teacher targets it is given; what the trainer reads passes through."""

    def __init__(self, loss):
        self.loss, self.targets = loss, []

    def __getattr__(self, name):
        return getattr(self.loss, name)

    def __call__(self, student, teacher, refs=None, neighbours=None):
        self.targets.append(teacher.detach().numpy().copy())
        return self.loss(student, teacher, refs=refs, neighbours=neighbours)


@pytest.mark.parametrize("center", [True, False])
def test_center_targets_are_the_teacher_vectors_less_their_training_mean(tiny_train, teacher_store, start, tmp_path, center):
    from engine.datasets.sfm import load_training_set
    from engine.store import open_store

    store = open_store(teacher_store)
    row = {name: i for i, name in enumerate(store.names())}
    raw = np.asarray(store.vectors(), dtype=np.float64)[[row[c] for c in load_training_set(
        tiny_train / "train" / "db.pkl").cids]]  # training order
    centred = raw - raw.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    trainer = trainer_for(tiny_train, teacher_store, start, tmp_path / "run", epochs=1, center=center)
    trainer.loss = spy = Spy(trainer.loss)
    trainer.train_epoch()
    targets = np.concatenate(spy.targets)
    want = centred if center else raw
    nearest = np.abs(targets[:, None, :] - want[None, :, :]).max(axis=2)  # targets x images
    assert sorted(nearest.argmin(axis=1)) == list(range(16))  # every image once (16 images an epoch)
    assert nearest.min(axis=1).max() < 1e-6
    if center:
        assert np.abs(raw.mean(axis=0)).max() > 1e-2  # the mean removed is not negligible


def scripted_validation(monkeypatch, scores):
    """Replace validation by scripted scores (one per call, in order) and record the weights each call saw."""
    import training.trainer

    seen = []

    def validate(student, val, max_side, workers=0):
        seen.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        asym, sym = scores[len(seen) - 1]
        return {"val_asym_mAP": asym, "val_sym_mAP": sym, "val_asym_hard": 0.0, "val_sym_hard": 0.0}

    monkeypatch.setattr(training.trainer, "validate", validate)
    return seen


@pytest.mark.parametrize("select,val_every,scores,best_epoch", [
    ("auto", 1, [(50.0, 10.0), (80.0, 20.0), (60.0, 90.0)], 2),  # asym mode chooses by asym: epoch 3 is worse
    ("sym", 1, [(50.0, 10.0), (80.0, 20.0), (60.0, 90.0)], 3),
    ("auto", 2, [(70.0, 0.0), (40.0, 0.0)], 2),  # validated after epochs 2 and 3 (the last) only
])
def test_best_checkpoint_is_the_best_validated_epoch(tiny_train, teacher_store, start, tmp_path, monkeypatch, select,
                                                     val_every, scores, best_epoch):
    seen = scripted_validation(monkeypatch, scores)
    out = tmp_path / "run"
    trainer_for(tiny_train, teacher_store, start, out, val=object(), select=select, val_every=val_every).fit()
    assert len(seen) == len(scores)
    validated = [e for e in (1, 2, 3) if e % val_every == 0 or e == 3]
    best = load_checkpoint(out / "best.safetensors")
    assert best.config["epoch"] == best_epoch
    key = "val_sym_mAP" if select == "sym" else "val_asym_mAP"
    assert best.config["metrics"][key] == max(s[key == "val_sym_mAP"] for s in scores)
    weights = seen[validated.index(best_epoch)]
    assert all(torch.equal(v, weights[k]) for k, v in best.state_dict().items())
    last = load_checkpoint(out / "last.safetensors")
    assert last.config["epoch"] == 3
    assert (best_epoch == 3) == all(torch.equal(v, weights[k]) for k, v in last.state_dict().items())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r.get(key) for r in log] == [scores[validated.index(e)][key == "val_sym_mAP"] if e in validated else None
                                         for e in (1, 2, 3)]


def test_validation_reports_the_students_map(tiny_train, tiny_bench, teacher_store, tmp_path, run_cli):
    """--val-gnd/--val-store end to end: the log carries the validation mAPs, best.safetensors the best epoch's."""
    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--gnd", tiny_bench / "gnd.pkl", "--out",
                           tmp_path / "val.store", "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    out = tmp_path / "run"
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, out, "--loss", "regression", "--epochs", 2, "--lr", "1e-3",
                                       "--freeze", "trunk", "--val-gnd", tiny_bench / "gnd.pkl",
                                       "--val-store", tmp_path / "val.store"))
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r[k] <= 100 for r in log for k in ("val_asym_mAP", "val_sym_mAP", "val_asym_hard", "val_sym_hard"))
    best = load_checkpoint(out / "best.safetensors")
    first_best = max(log, key=lambda r: (r["val_asym_mAP"], -r["epoch"]))
    assert best.config["epoch"] == first_best["epoch"] and {"epoch": best.config["epoch"], **best.config["metrics"]} == first_best


def test_whiten_installs_lw_and_changes_the_teacher_space(tiny_train, teacher_store, tmp_path, run_cli):
    code, _, err = run_cli("whiten", "--model", "effnet-lite2-gem", "--pairs", tiny_train / "train" / "db.pkl",
                           "--out", tmp_path / "tw.safetensors", "--dim", 32, "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    enc = load_checkpoint(tmp_path / "tw.safetensors")
    assert enc.dim == 32 and enc.head.whiten.weight.shape == (32, 1280)
    assert enc.space != json.loads((teacher_store / "manifest.json").read_text())["space"]
    # The layer is Lw learnt from the teacher's own vectors of the pairs (the store holds them, same size).
    from engine.datasets.sfm import load_training_set
    from engine.store import open_store
    from training.whitening import apply_whitening, learn_whitening

    ts, store = load_training_set(tiny_train / "train" / "db.pkl"), open_store(teacher_store)
    row = {name: i for i, name in enumerate(store.names())}
    X = np.asarray(store.vectors(), dtype=np.float64)[[row[c] for c in ts.cids]]
    m, P = learn_whitening(X, ts.qidxs, ts.pidxs)
    got = torch.nn.functional.normalize(torch.from_numpy(X).float() @ enc.head.whiten.weight.T + enc.head.whiten.bias, dim=1)
    np.testing.assert_allclose(got.detach().numpy(), apply_whitening(X, m, P, dim=32), atol=1e-3)


def test_frozen_trunk_trains_only_the_head(tiny_train, teacher_store, tmp_path, run_cli):
    from engine.models import build_student, registry_teacher_of

    code, _, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "run", "--loss", "regression",
                                       "--epochs", 1, "--lr", "1e-3", "--freeze", "trunk"))
    assert code == 0, err
    trained = load_checkpoint(tmp_path / "run" / "last.safetensors")
    start = build_student("mobilenetv2", trained.dim, trained.space, bridge_to=registry_teacher_of(trained.space))
    assert start.config["head_init"] == trained.config["head_init"] == "imagenet-bridge"
    for a, b in zip(trained.trunk.state_dict().values(), start.trunk.state_dict().values()):
        assert (a == b).all()
    assert not (trained.head.project.weight == start.head.project.weight).all()


@pytest.mark.slow
def test_sym_fine_tuning_of_a_teacher_moves_it_into_a_new_space(tiny_train, teacher_store, tmp_path, run_cli):
    from engine.models import build_teacher, space_id

    code, _, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "r", "--student", "effnet-lite2-gem",
                                       "--loss", "contrastive", "--mode", "asym"))
    assert code != 0 and "--mode sym" in err
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "run", "--student", "effnet-lite2-gem",
                                       "--loss", "contrastive", "--mode", "sym", "--epochs", 1, "--lr", "1e-3",
                                       "--query-size", 4, "--pool-size", 16))
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "run" / "last.safetensors")
    start = build_teacher("effnet-lite2-gem")
    assert tuned.config["role"] == "teacher" and tuned.head.whiten is None and tuned.dim == start.dim
    assert tuned.space != start.space and tuned.space == space_id(tuned)
    changed = [not torch.equal(a, b) for a, b in zip(tuned.trunk.state_dict().values(), start.trunk.state_dict().values())]
    assert any(changed)
