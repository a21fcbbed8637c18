"""`engine demo` end to end on a folder of photographs: the table's settings, the gap, the report."""
import json

import pytest
from PIL import Image
from skimage import data


@pytest.mark.slow
def test_demo_on_a_photo_folder(tmp_path, run_cli):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.jpg", quality=92)
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--photos", photos, "--json", "--scales", "1,0.707")
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
    assert manifest["info"]["encode"]["scales"] == [1.0, 2**-0.5]  # the test images at both scales (0.707: 1/sqrt(2))
