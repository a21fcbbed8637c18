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
                                             ("triplet", "sym", ("--margin", 1.0)),  # a margin no tiny-set triplet satisfies
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
    (("--freeze", "all"), "--freeze must be one of bn, stats, trunk, got 'all'"),
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

    def validate(student, val, max_side, workers=0, scales=(1.0,)):
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


# ---------------------------------------------------------------- recipes: presets that explicit options override
def test_recipes_preset_values_that_explicit_options_override():
    from training.recipes import RECIPES

    aml = TrainConfig.from_recipe("aml")
    assert {k: getattr(aml, k) for k in RECIPES["aml"] if k not in ("margin",)} == {
        k: v for k, v in RECIPES["aml"].items() if k != "margin"}
    assert (aml.recipe, aml.lr, aml.epochs, aml.max_side, aml.freeze, aml.reduction) == ("aml", 1e-6, 100, 1024, "stats", "sum")
    assert aml.margin is None  # regression takes no margin: the recipe's applies to losses that do
    assert TrainConfig.from_recipe("aml", loss="contrastive").margin == 0.7
    assert TrainConfig.from_recipe("aml", loss="rkd").reduction is None  # RKD takes no reduction
    over = TrainConfig.from_recipe("aml", lr=1e-3, loss="triplet", margin=0.2)
    assert (over.lr, over.margin, over.epochs) == (1e-3, 0.2, 100)
    demo = TrainConfig.from_recipe("demo")
    assert (demo.freeze, demo.lr, demo.batch_size) == ("trunk", 1e-5, 4)
    assert TrainConfig.from_recipe(None) == TrainConfig()
    for cfg in (aml, over, demo):
        cfg.check()
    with pytest.raises(EngineError, match="--recipe must be one of demo, aml, got 'paper'"):
        TrainConfig(recipe="paper").check()
    with pytest.raises(EngineError, match="loss rkd takes no reduction"):
        TrainConfig(loss="rkd", reduction="sum").check()


def test_the_aml_recipe_runs_with_overrides_and_is_recorded(tiny_train, teacher_store, start, tmp_path, run_cli):
    """--recipe aml with its heavy values overridden: the checkpoint says which recipe and holds the preset values
    not overridden; BatchNorm keeps its statistics while its affine weights learn (cirtorch's handling)."""
    out = tmp_path / "run"
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, out, "--recipe", "aml", "--init", start, "--epochs", 1,
                                       "--lr", "1e-3", "--images-per-epoch", 5, "--weight-decay", 0))
    assert code == 0, err
    trained = load_checkpoint(out / "last.safetensors")
    cfg = trained.config["train"]
    assert cfg["recipe"] == "aml" and cfg == json.loads((out / "config.json").read_text())
    assert (cfg["lr"], cfg["max_side"], cfg["batch_size"], cfg["epochs"]) == (1e-3, SIDE, 2, 1)  # given explicitly
    assert (cfg["freeze"], cfg["reduction"], cfg["images_per_batch"], cfg["center"], cfg["lr_decay"]) == ("stats", "sum", 5, False, 0.01)
    assert cfg["val_scales"] == [1.0, 1 / math.sqrt(2), 0.5]
    before = load_checkpoint(start).state_dict()
    after = trained.state_dict()
    bn = [n for n, m in load_checkpoint(start).named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bn
    assert all(torch.equal(after[f"{n}.running_mean"], before[f"{n}.running_mean"]) for n in bn)
    assert any(not torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in bn)


def test_the_demo_recipe_freezes_the_trunk(tiny_train, teacher_store, start, tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, out, "--recipe", "demo", "--init", start, "--epochs", 1))
    assert code == 0, err
    trained = load_checkpoint(out / "last.safetensors")
    assert {k: trained.config["train"][k] for k in ("recipe", "freeze", "lr", "batch_size")} == {
        "recipe": "demo", "freeze": "trunk", "lr": 1e-5, "batch_size": 2}  # --batch-size 2 given explicitly
    before = load_checkpoint(start).state_dict()
    assert all(torch.equal(w, before[n]) for n, w in trained.state_dict().items() if n.startswith("trunk."))


# ---------------------------------------------------------------- early stopping
def test_early_stopping_keeps_the_best_and_resumes_with_more_patience(tiny_train, teacher_store, start, tmp_path,
                                                                      monkeypatch):
    seen = scripted_validation(monkeypatch, [(50.0, 0.0), (40.0, 0.0), (45.0, 0.0), (70.0, 0.0), (10.0, 0.0)])
    out = tmp_path / "run"
    metrics = trainer_for(tiny_train, teacher_store, start, out, val=object(), epochs=5, patience=2).fit()
    assert len(seen) == 3 and metrics["stopped_early"]  # epochs 2 and 3 brought nothing better than epoch 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert load_checkpoint(out / "best.safetensors").config["epoch"] == 1
    again = trainer_for(tiny_train, teacher_store, start, out, val=object(), epochs=5, patience=2)
    assert again.fit()["stopped_early"] and len(seen) == 3  # a stopped run stays stopped
    more = trainer_for(tiny_train, teacher_store, start, out, val=object(), epochs=5, patience=3)
    metrics = more.fit()  # patience is a resumable change: epoch 4 is better, epoch 5 is not
    assert len(seen) == 5 and "stopped_early" not in metrics
    assert load_checkpoint(out / "best.safetensors").config["epoch"] == 4


# ---------------------------------------------------------------- validation on held-out scenes, end to end
@pytest.fixture(scope="module")
def views_bench(tmp_path_factory):
    """The views benchmark over 8 packaged photographs, small: 3 training, 1 validation and 4 test scenes."""
    from PIL import Image
    from skimage import data

    from engine.datasets.views import build_views

    root = tmp_path_factory.mktemp("views")
    photos = root / "photos"
    photos.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.jpg", quality=92)
    info = build_views(root / "bench", photos=sorted(photos.iterdir()), size=96, n_gallery=3, n_queries=1, n_train=3,
                       train_fraction=0.5, opencv_doc=None)
    return root / "bench", info


@pytest.mark.parametrize("n", [4, 5, 8, 40])
def test_validation_scenes_come_from_the_training_side(n):
    from engine.datasets.views import split_scenes

    photos = [Path(f"p{i}.jpg") for i in range(n)]
    before = split_scenes(photos, 0, 0.4, {photos[0]}, val_fraction=0.0)
    after = split_scenes(photos, 0, 0.4, {photos[0]}, val_fraction=0.2)
    assert [s == "test" for s in after] == [s == "test" for s in before]  # the test scenes do not move
    assert all(b == "train" for a, b in zip(after, before) if a == "val")
    assert after.count("val") == (0 if before.count("train") < 3 else max(1, round(0.2 * before.count("train"))))
    assert after.count("train") >= 2 or after.count("val") == 0  # mining keeps another cluster


def test_validation_on_held_out_scenes_end_to_end(views_bench, tmp_path, run_cli):
    from engine.datasets.revisited import load_gnd
    from engine.datasets.sfm import load_training_set

    bench, info = views_bench
    assert info["val_split"] == "scenes" and info["counts"]["scenes"] == {"train": 3, "val": 1, "test": 4}
    scene = lambda name: name.split("_")[1]  # noqa: E731  (views are named SPLIT_NN_photo_...)
    db = bench / "train" / "db.pkl"
    train_scenes = {scene(c) for c in load_training_set(db).cids}
    val = load_gnd(bench / "val" / "gnd.pkl")
    test = load_gnd(bench / "test" / "gnd.pkl")
    val_scenes = {scene(n) for n in val["imlist"] + val["qimlist"]}
    assert len(val_scenes) == 1 and not val_scenes & train_scenes
    assert not {scene(n) for n in test["imlist"]} & (train_scenes | val_scenes)
    for args in (("--train-set", db, "--out", tmp_path / "train.store"),
                 ("--gnd", bench / "val" / "gnd.pkl", "--out", tmp_path / "val.store")):
        code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", *args, "--max-side", SIDE, "--workers", 0)
        assert code == 0, err
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "--out", out, "--teacher-store", tmp_path / "train.store", "--train-set", db,
                                "--recipe", "demo", "--lr", "1e-3", "--epochs", 4, "--patience", 1, "--max-side", SIDE,
                                "--workers", 0, "--val-gnd", bench / "val" / "gnd.pkl", "--val-store", tmp_path / "val.store")
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scores = [r["val_asym_mAP"] for r in log]
    assert all(0 <= s <= 100 for s in scores)
    best = load_checkpoint(out / "best.safetensors")
    assert best.config["metrics"]["val_asym_mAP"] == max(scores)
    assert best.config["epoch"] == 1 + scores.index(max(scores))
    # patience 1: training ran until the first validation that did not improve, or to the end
    stalled = [i for i in range(1, len(scores)) if scores[i] <= max(scores[:i])]
    assert len(log) == (stalled[0] + 1 if stalled else 4)
    assert json.loads(stdout.strip().splitlines()[-1]).get("stopped_early", False) == bool(stalled)


# ---------------------------------------------------------------- label-free gallery adaptation
def regression_objective(student, items, targets) -> float:
    from engine.encode import EncodeOptions, encode_to_array

    vecs, _, _ = encode_to_array(student, items, EncodeOptions(max_side=SIDE, workers=0, progress=False, backend="torch"))
    return float(0.5 * ((vecs - targets) ** 2).sum(axis=1).mean())


def test_gallery_adaptation_runs_resumes_and_lowers_its_objective(tiny_bench, start, tmp_path, run_cli):
    from engine.datasets import revisited
    from engine.store import open_store

    gallery = tmp_path / "gallery.store"
    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--gnd", tiny_bench / "gnd.pkl", "--out", gallery,
                           "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    out = tmp_path / "adapt"
    args = ("train", "--adapt-gallery", gallery, "--images", tiny_bench / "jpg", "--init", start, "--out", out,
            "--recipe", "demo", "--lr", "1e-3", "--no-center", "--max-side", SIDE, "--workers", 0)
    code, _, err = run_cli(*args, "--epochs", 2)
    assert code == 0, err
    code, _, err = run_cli(*args, "--epochs", 4)
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]  # resumed, not restarted
    assert log[-1]["loss"] < log[0]["loss"]
    adapted = load_checkpoint(out / "last.safetensors")
    assert adapted.config["train"]["gallery"] == str(gallery.resolve()) or adapted.config["train"]["gallery"] == str(gallery)
    cfg = revisited.load_gnd(tiny_bench / "gnd.pkl")
    items = revisited.gallery_items(cfg, tiny_bench / "jpg")
    targets = open_store(gallery).vectors()
    assert regression_objective(adapted, items, targets) < 0.9 * regression_objective(load_checkpoint(start), items, targets)


@pytest.mark.parametrize("extra,message", [
    (("--loss", "contrastive"), "contrastive needs labelled tuples, a gallery has none"),
    (("--images", "elsewhere"), "is not a folder"),
])
def test_gallery_adaptation_refusals_are_one_line(tiny_bench, tmp_path, run_cli, extra, message):
    gallery = tmp_path / "gallery.store"
    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--gnd", tiny_bench / "gnd.pkl", "--out", gallery,
                           "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    extra = tuple(tmp_path / v if v == "elsewhere" else v for v in extra)
    images = () if "--images" in extra else ("--images", tiny_bench / "jpg")
    code, _, err = run_cli("train", "--adapt-gallery", gallery, *images, "--out", tmp_path / "adapt", "--workers", 0, *extra)
    assert code == EXIT_INPUT and len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.slow
def test_demo_adapt_adds_the_transductive_rows(tmp_path, run_cli, photo_folder):
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--photos", photo_folder, "--json", "--adapt", "--epochs", 1)
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"teacher_sym", "student_sym", "student_asym", "student_adapted_asym", "student_adapted_sym"}
    assert all(0 <= metrics[k]["medium"]["mAP"] <= 100 for k in metrics)
    adapted = load_checkpoint(tmp_path / "demo" / "adapt-untrained" / "last.safetensors")
    assert adapted.config["train"]["gallery"].endswith("teacher.store") and adapted.config["epoch"] == 1
