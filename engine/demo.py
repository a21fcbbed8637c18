"""`engine demo`: the whole pipeline on the offline views benchmark, in a few minutes on a laptop CPU.

benchmark -> teacher encodes the gallery into a store -> teacher and student encode the queries
-> search -> revisited-protocol evaluation, for three settings: teacher symmetric, student
symmetric (the student encodes both sides), student asymmetric (student queries, teacher gallery).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console

from .datasets import revisited
from .encode import EncodeOptions, default_workers, encode_to_array, encode_to_store, save_vectors
from .evaluate import evaluate_revisited, ranks_from_ids
from .models import build_student, build_teacher
from .search import search
from .store import Store

TEACHER = "effnet-lite2-gem"
MAX_SIDE = 362


def _queries(enc, items, names, path: Path, opts: EncodeOptions) -> np.ndarray:
    vecs, kept, skipped = encode_to_array(enc, items, opts)
    if skipped:  # every query must have a vector for the protocol
        raise RuntimeError(f"{len(skipped)} benchmark queries failed to decode: {skipped[0]}")
    save_vectors(path, vecs, {"space": enc.space, "dim": enc.dim, "encoder": enc.config, "names": names})
    return vecs


def _evaluate(store: Store, queries: np.ndarray, space: str, gnd: list, result_path: Path) -> dict:
    scores, ids = search(store, queries, store.count, space=space)
    np.savez(result_path, ids=ids, scores=scores)
    return evaluate_revisited(ranks_from_ids(ids), gnd)


def run_demo(out_dir: Path, photos: Path | None = None, student: str = "mobilenetv2", log: Console | None = None,
             difficulty: str = "medium", seed: int = 0) -> dict:
    """Run the demo into `out_dir`; returns {"metrics": {setting: eval dict}, "benchmark": str, "notes": [str]}."""
    from .datasets.views import build_views

    log = log or Console(stderr=True)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    bench = out_dir / "views"
    log.print(f"building the views benchmark in {bench}")
    build_views(bench, photos=photos, difficulty=difficulty, seed=seed)
    gnd_path = bench / "test" / "gnd.pkl"
    cfg = revisited.load_gnd(gnd_path)
    images_dir = revisited.images_dir_for(gnd_path)
    gallery = revisited.gallery_items(cfg, images_dir)
    queries = revisited.query_items(cfg, images_dir)

    teacher = build_teacher(TEACHER)
    stu = build_student(student, teacher.dim, teacher.space, teacher=teacher.name)
    opts = EncodeOptions(max_side=MAX_SIDE, workers=default_workers())
    log.print(f"teacher {teacher.name} (D = {teacher.dim}); untrained student {stu.name}")

    opts.label = "teacher gallery"
    t_store = encode_to_store(teacher, gallery, cfg["imlist"], out_dir / "teacher.store", opts)
    opts.label = "student gallery"
    s_store = encode_to_store(stu, gallery, cfg["imlist"], out_dir / "student.store", opts)
    opts.label = "teacher queries"
    q_teacher = _queries(teacher, queries, cfg["qimlist"], out_dir / "queries_teacher.npy", opts)
    opts.label = "student queries"
    q_student = _queries(stu, queries, cfg["qimlist"], out_dir / "queries_student.npy", opts)

    results = out_dir / "results"
    results.mkdir(exist_ok=True)
    metrics = {
        "teacher_sym": _evaluate(t_store, q_teacher, teacher.space, cfg["gnd"], results / "teacher_sym.npz"),
        "student_sym": _evaluate(s_store, q_student, stu.space, cfg["gnd"], results / "student_sym.npz"),
        "student_asym": _evaluate(t_store, q_student, stu.space, cfg["gnd"], results / "student_asym.npz"),
    }
    elapsed = time.perf_counter() - t0
    notes = [
        f"gallery {len(gallery)} images, {len(queries)} queries; benchmark in {bench}",
        f"stores: {out_dir / 'teacher.store'} (teacher), {out_dir / 'student.store'} (student); results in {results}",
        f"total time {elapsed:.0f} s",
    ]
    return {"metrics": metrics, "benchmark": f"views ({bench})", "notes": notes, "seconds": elapsed}
