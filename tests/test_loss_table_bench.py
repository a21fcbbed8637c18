"""bench/loss_table.py: the experiment table's rows and columns are the ones it names."""
import importlib.util
import sys
from pathlib import Path

from training.losses import LOSSES

_spec = importlib.util.spec_from_file_location("loss_table", Path(__file__).parents[1] / "bench" / "loss_table.py")
loss_table = importlib.util.module_from_spec(_spec)
sys.modules["loss_table"] = loss_table  # dataclasses look their module up there
_spec.loader.exec_module(loss_table)


def test_every_loss_has_an_asymmetric_row_and_each_symmetric_form_a_symmetric_one():
    rows = loss_table.plan(list(LOSSES))
    trained = [r for r in rows if r.loss and not r.adapted]
    assert sorted(r.loss for r in trained if r.mode == "asym") == sorted(LOSSES)
    assert {r.loss for r in trained if r.mode == "sym"} == {name for name, cls in LOSSES.items() if cls.symmetric_form}
    assert {"contrastive", "triplet", "multi-similarity"} <= {r.loss for r in trained if r.mode == "sym"}
    assert rows[0].loss is None and not rows[0].adapted  # the untrained student first
    assert len({r.name for r in rows}) == len(rows)  # each row its own files


def test_adaptation_rows_come_last_and_apart():
    rows = loss_table.plan(list(LOSSES))
    adapted = [r for r in rows if r.adapted]
    assert rows[-len(adapted):] == adapted and all("transductive" in r.label for r in adapted)
    assert [(r.loss, r.mode) for r in adapted] == [(None, "asym"), ("regression", "asym")]
    assert [r.loss for r in loss_table.plan(["contrastive"]) if r.adapted] == [None]  # no regression row to adapt


def test_cells_land_under_their_columns():
    def m(medium):
        return {"medium": {"mAP": medium}, "hard": {"mAP": medium - 10}}

    res = {"ss": {"asym": m(71), "sym": m(72)}, "ms": {"asym": m(81), "sym": m(82)}}
    lines = loss_table.table({"ss": m(83), "ms": m(84)}, [(loss_table.Row("x"), res)])
    assert lines[0] == "| student | asym SS | sym SS | asym MS | sym MS |"
    assert lines[2].endswith("| - | 83.00 / 73.00 | - | 84.00 / 74.00 |")
    assert lines[3] == "| x | 71.00 / 61.00 | 72.00 / 62.00 | 81.00 / 71.00 | 82.00 / 72.00 |"
