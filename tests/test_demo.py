"""`engine demo` end to end on a folder of photographs: the table's settings, the gap, the report."""
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_on_a_photo_folder(tmp_path, run_cli, photo_folder):
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--photos", photo_folder, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"teacher_sym", "student_sym", "student_asym"}
    for setting in metrics.values():
        assert set(setting) == {"easy", "medium", "hard"}
    # The untrained student's queries already find the teacher's gallery through the classifier bridge
    # (a random head scores a few percent here), though the teacher stays ahead.
    assert 25 < metrics["student_asym"]["medium"]["mAP"] < metrics["teacher_sym"]["medium"]["mAP"]
    assert (tmp_path / "demo" / "report" / "index.html").exists()
    manifest = json.loads((tmp_path / "demo" / "teacher.store" / "manifest.json").read_text())
    assert manifest["info"]["encode"]["scales"] == [1.0, 2 ** -0.5, 0.5]  # the test images at the three scales
    # Every photograph of the folder is a test scene; the built-in photographs, less these, are the training scenes.
    info = json.loads((tmp_path / "demo" / "views" / "info.json").read_text())
    tested = {p["path"] for p in info["photos"] if p["split"] == "test"}
    assert tested == {str(p) for p in photo_folder.iterdir()}
    trained = [p["path"] for p in info["photos"] if p["split"] == "train"]
    assert trained and not any(Path(t).stem in {"astronaut", "coffee", "chelsea", "rocket", "coins", "camera"} for t in trained)


def test_the_demo_defaults_are_the_library_defaults():
    import inspect

    import typer

    from engine.cli import app
    from engine.cli.demo import SCALES, STUDENT, run_demo

    assert inspect.signature(run_demo).parameters["scales"].default == SCALES == (1.0, 2 ** -0.5, 0.5)  # not 0.707
    student = next(p for p in typer.main.get_command(app).commands["demo"].params if p.name == "student")
    assert student.default == STUDENT == inspect.signature(run_demo).parameters["student"].default


@pytest.mark.parametrize("flag, scales", [([], (1.0, 2 ** -0.5, 0.5)), (["--single-scale"], (1.0,))])
def test_single_scale_is_a_flag(run_cli, tmp_path, monkeypatch, flag, scales):
    import engine.cli.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out_dir, **kw: seen.update(kw) or {"metrics": {}})
    code, _, err = run_cli("demo", "--out", tmp_path / "d", "--json", *flag)
    assert code == 0, err
    assert seen["scales"] == scales
