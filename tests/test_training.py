"""`engine train` end to end on a tiny training set: every loss family runs, learns, checkpoints and resumes."""
import json
import sys

import pytest
import torch

from engine.models import load_checkpoint

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


@pytest.mark.parametrize("loss,mode", [("contrastive", "asym"), ("contrastive+", "asym"), ("triplet", "sym"),
                                       ("multi-similarity", "asym"), ("rkd", "asym"), ("csd", "asym")])
def test_each_loss_family_trains_an_epoch(tiny_train, teacher_store, tmp_path, run_cli, loss, mode):
    code, out, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "run", "--loss", loss, "--mode", mode,
                                         "--epochs", 1, "--query-size", 4, "--pool-size", 16))
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1]) if out.strip() else json.loads(err.strip().splitlines()[-1])
    assert metrics["loss"] == metrics["loss"]  # finite, not NaN
    assert (tmp_path / "run" / "last.safetensors").exists()


def test_bad_training_inputs(tiny_train, teacher_store, tmp_path, run_cli):
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "r", "--loss", "regression", "--mode", "sym"))
    assert code != 0 and "no symmetric form" in err
    code, _, err = run_cli(*train_args(tiny_train, teacher_store, tmp_path / "r", "--loss", "nope"))
    assert code != 0 and "unknown loss" in err
    code, _, err = run_cli(*train_args(tiny_train, tmp_path / "missing.store", tmp_path / "r"))
    assert code != 0 and "missing.store" in err


def test_whiten_installs_lw_and_changes_the_teacher_space(tiny_train, teacher_store, tmp_path, run_cli):
    code, _, err = run_cli("whiten", "--model", "effnet-lite2-gem", "--pairs", tiny_train / "train" / "db.pkl",
                           "--out", tmp_path / "tw.safetensors", "--dim", 32, "--max-side", SIDE, "--workers", 0)
    assert code == 0, err
    enc = load_checkpoint(tmp_path / "tw.safetensors")
    assert enc.dim == 32 and enc.head.whiten.weight.shape == (32, 1280)
    assert enc.space != json.loads((teacher_store / "manifest.json").read_text())["space"]


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
    assert not (trained.head.whiten.weight == start.head.whiten.weight).all()


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
