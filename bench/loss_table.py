"""The experiment table (issue 14): every loss, each student asymmetric and symmetric, single- and multi-scale.

Rows: the untrained student (the classifier bridge); the student trained with each loss in asymmetric mode (the
teacher's vectors are the references) and, for the losses that have the form, in symmetric mode (no teacher in the
loss); then label-free gallery adaptation (regression onto the test gallery's own teacher vectors, from the
untrained and from the regression-trained student), transductive, so in rows of their own. Every student is
trained once, exactly as `engine demo --train LOSS` trains it (the views benchmark's training scenes, the demo
recipe, the training images at one scale: engine.cli.demo's functions), and evaluated under both protocols: the
test images at one scale and at the multi-scale protocol (1, 1/sqrt(2), 1/2), asymmetrically (its queries against
the teacher's gallery) and symmetrically (against its own). Adaptation fits the multi-scale teacher gallery, as
`engine demo --adapt` does.

    python bench/loss_table.py OUT [--photos DIR] [--losses regression contrastive ...] [--epochs 10]

Resumable: each finished row is saved as OUT/rows/NAME.json and skipped on a rerun. Prints the markdown table
(Medium / Hard mAP) and writes OUT/loss_table.json.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from engine.cli.demo import SCALES, STUDENT, TEACHER, adapt_on_gallery, evaluate_encoder, train_on_views
from engine.datasets import revisited
from engine.datasets.photos import default_photos, photos_in, unseen
from engine.datasets.views import build_views
from engine.encode import EncodeOptions, default_workers, encode_to_store
from engine.files import write_text
from engine.models import build_student, build_teacher, load_checkpoint, save_checkpoint
from training.losses import LOSSES

PROTOCOLS = {"ss": (1.0,), "ms": SCALES}
COLUMNS = [("asym", "ss"), ("sym", "ss"), ("asym", "ms"), ("sym", "ms")]


@dataclass(frozen=True)
class Row:
    """One student of the table: trained with `loss` in `mode` (None: untrained), then adapted to the test gallery
    when `adapted` (transductive)."""

    label: str
    loss: str | None = None
    mode: str = "asym"
    adapted: bool = False

    @property
    def name(self) -> str:
        """A file-safe name of the row ('+' spelt out: contrastive+ is not contrastive)."""
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower().replace("+", "plus")).strip("-")


def plan(losses: list[str]) -> list[Row]:
    """The table's rows for `losses`, in order: untrained, each loss asymmetric, each loss with a symmetric form
    symmetric, then the adaptation rows (from untrained, and from regression when it is among `losses`)."""
    rows = [Row("untrained student (classifier bridge)")]
    rows += [Row(f"{loss} (asym)", loss) for loss in losses]
    rows += [Row(f"{loss} (sym: no teacher in the loss)", loss, "sym") for loss in losses if LOSSES[loss].symmetric_form]
    rows.append(Row("untrained, adapted to the test gallery (transductive)", adapted=True))
    if "regression" in losses:
        rows.append(Row("regression (asym), adapted to the test gallery (transductive)", "regression", adapted=True))
    return rows


def cell(metrics: dict) -> str:
    """'Medium / Hard' mAP of one evaluate_revisited dict."""
    return f"{metrics['medium']['mAP']:.2f} / {metrics['hard']['mAP']:.2f}"


def table(teacher: dict, results: list[tuple[Row, dict]]) -> list[str]:
    """Markdown lines: the teacher, then one line per row; results[i][1] maps protocol -> setting -> metrics."""
    lines = ["| student | asym SS | sym SS | asym MS | sym MS |", "|---|---|---|---|---|",
             f"| teacher ({TEACHER}) | - | {cell(teacher['ss'])} | - | {cell(teacher['ms'])} |"]
    for row, res in results:
        lines.append(f"| {row.label} | " + " | ".join(cell(res[p][s]) for s, p in COLUMNS) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--photos", type=Path, help="a photo folder: every photograph a test scene (engine demo --photos)")
    ap.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--student", default=STUDENT)
    args = ap.parse_args(argv)
    out = args.out
    bench = out / "views"
    scene = photos_in(args.photos) if args.photos else None
    build_views(bench, photos=scene, train_photos=unseen(default_photos(), scene) if scene else None)
    gnd_path = bench / "test" / "gnd.pkl"
    cfg = revisited.load_gnd(gnd_path)
    images = revisited.images_dir_for(gnd_path)
    gallery, queries = revisited.gallery_items(cfg, images), revisited.query_items(cfg, images)

    teacher = build_teacher(TEACHER)
    untrained = build_student(args.student, teacher.dim, teacher.space, teacher=teacher.name, bridge_to=teacher)
    opts = {p: EncodeOptions(workers=default_workers(), scales=s) for p, s in PROTOCOLS.items()}
    t_stores, teacher_res = {}, {}
    for p in PROTOCOLS:
        opts[p].label = f"teacher gallery ({p})"
        t_stores[p] = encode_to_store(teacher, gallery, cfg["imlist"], out / p / "teacher.store", opts[p], rebuild_stale=True)
        # the store just made is found complete and reused: this encodes the teacher's queries and evaluates
        teacher_res[p] = evaluate_encoder(teacher, "teacher", gallery, queries, cfg, t_stores[p], out / p, opts[p])["teacher_sym"]

    trained: dict[tuple[str, str], Path] = {}

    def checkpoint(row: Row) -> Path:
        """The row's student before adaptation: trained once per (loss, mode), or the untrained one saved."""
        if row.loss is None:
            return save_checkpoint(untrained, out / "untrained.safetensors")
        key = (row.loss, row.mode)
        if key not in trained:
            trained[key] = train_on_views(teacher, args.student, row.loss, bench, out / "train", opts["ss"], args.epochs,
                                          row.mode)
        return trained[key]

    results = []
    for row in plan(args.losses):
        done = out / "rows" / f"{row.name}.json"
        if done.exists():
            results.append((row, json.loads(done.read_text())["results"]))
            continue
        t0 = time.perf_counter()
        path = checkpoint(row)
        if row.adapted:
            path = adapt_on_gallery(args.student, path, out / "ms" / "teacher.store", gallery, out / "adapt" / row.name, opts["ms"],
                                    args.epochs)
        student = load_checkpoint(path)
        tag = row.name.replace("-", "_")
        res = {}
        for p in PROTOCOLS:
            m = evaluate_encoder(student, tag, gallery, queries, cfg, t_stores[p], out / p, opts[p])
            res[p] = {s: m[f"{tag}_{s}"] for s in ("asym", "sym")}
        done.parent.mkdir(exist_ok=True)
        write_text(done, json.dumps({"row": row.label, "seconds": time.perf_counter() - t0, "results": res}))
        results.append((row, res))
        print(table(teacher_res, [(row, res)])[-1], flush=True)
    lines = table(teacher_res, results)
    write_text(out / "loss_table.json", json.dumps({"teacher": teacher_res, "rows": [
        {"row": r.label, "loss": r.loss, "mode": r.mode, "adapted": r.adapted, "results": res} for r, res in results]}))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
