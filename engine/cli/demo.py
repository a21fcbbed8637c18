"""`engine demo`: the whole pipeline on the offline views benchmark, in a few minutes on a laptop CPU.

benchmark -> teacher encodes the gallery into a store -> teacher and student encode the queries
-> search -> revisited-protocol evaluation, for three settings: teacher symmetric, student
symmetric (the student encodes both sides), student asymmetric (student queries, teacher gallery).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console

from ..datasets import revisited
from ..encode import EncodeOptions, default_workers, encode_to_array, encode_to_store, save_vectors
from ..errors import EngineError
from ..evaluate import evaluate_revisited, rank_by_similarity, ranks_from_ids
from ..models import build_student, build_teacher
from ..results import save_results
from ..search import search
from ..store import Store

TEACHER = "effnet-lite2-gem"
# EfficientNet-Lite0 rather than the paper's MobileNetV2: its classifier bridge lands nearer the teacher
# (multi-scale, asymmetric Medium mAP 77.2 against 70.5 untrained, 80.1 against 76.3 trained; bench/RESULTS.md)
# at about the same CPU time.
STUDENT = "effnet-lite0"
SCALES = (1.0, 2 ** -0.5, 0.5)  # METHOD.md's multi-scale protocol for the test images; (1.0,) for single scale


def _queries(enc, items, names, path: Path, opts: EncodeOptions) -> np.ndarray:
    vecs, kept, skipped = encode_to_array(enc, items, opts)
    if skipped:  # every query must have a vector for the protocol
        raise EngineError(f"{len(skipped)} benchmark queries failed to decode (first: {skipped[0]})", path)
    save_vectors(path, vecs, {"space": enc.space, "dim": enc.dim, "encoder": enc.config, "names": names})
    return vecs


def _evaluate(store: Store, queries: np.ndarray, space: str, gnd: list, result_path: Path) -> dict:
    scores, ids = search(store, queries, store.count, space=space)
    save_results(result_path, ids, scores)
    return evaluate_revisited(ranks_from_ids(ids), gnd)


def train_on_views(teacher, student: str, loss: str, bench: Path, out_dir: Path, opts: EncodeOptions, epochs: int,
                   mode: str = "asym") -> Path:
    """Train a student on the views benchmark `bench`'s training split by the demo recipe (teacher vectors encoded
    once into `out_dir`, validation on the held-out scenes); returns the best checkpoint's path. mode: asym (the
    teacher's vectors are the references) or sym (the student's own, for the losses that have that form)."""
    from training.data import load_train_data
    from training.trainer import TrainConfig, Trainer
    from training.validate import load_val_set

    from ..datasets.sfm import load_training_set

    db = bench / "train" / "db.pkl"
    ts = load_training_set(db)
    opts.label = "teacher: training images"
    train_store = encode_to_store(teacher, [(p, None) for p in ts.images], ts.cids, out_dir / "teacher_train.store", opts,
                                  rebuild_stale=True)
    val_gnd = bench / "val" / "gnd.pkl"
    val_cfg = revisited.load_gnd(val_gnd)
    opts.label = "teacher: validation gallery"
    encode_to_store(teacher, revisited.gallery_items(val_cfg, revisited.images_dir_for(val_gnd)), val_cfg["imlist"],
                    out_dir / "teacher_val.store", opts, rebuild_stale=True)
    # The shortest useful run: the trunk stays frozen (its maps are computed once), so epochs take seconds,
    # and validation runs once at the end.
    cfg = TrainConfig.from_recipe("demo", student=student, loss=loss, mode=mode, epochs=epochs,
                                  images_per_epoch=len(ts.images), query_size=min(len(ts.qidxs), len(ts.images)),
                                  pool_size=len(ts.images), max_side=opts.max_side, workers=opts.workers, val_every=epochs)
    run = out_dir / run_name(loss, mode)
    trainer = Trainer(cfg, load_train_data(db, train_store), run, load_val_set(val_gnd, out_dir / "teacher_val.store"))
    trainer.fit()
    return run / "best.safetensors"


def run_name(loss: str, mode: str = "asym") -> str:
    """The folder of a training run under the demo's output: train-LOSS, train-LOSS-sym in symmetric mode."""
    return f"train-{loss}" + ("-sym" if mode == "sym" else "")


def adapt_on_gallery(student: str, init: Path, teacher_store: Path, gallery: list, out_dir: Path, opts: EncodeOptions,
                     epochs: int) -> Path:
    """Fit the student checkpoint `init` to the test gallery's own images and their vectors in `teacher_store`,
    label-free (regression by the demo recipe), in `out_dir`; returns the last checkpoint's path. Transductive:
    the student has then seen the gallery it is tested on."""
    from training.adapt import adapt_to_gallery
    from training.trainer import TrainConfig

    cfg = TrainConfig.from_recipe("demo", student=student, loss="regression", epochs=epochs, max_side=opts.max_side,
                                  workers=opts.workers)
    adapt_to_gallery(cfg, teacher_store, out_dir, paths=[p for p, _ in gallery], init=init, progress=False)
    return out_dir / "last.safetensors"


def evaluate_encoder(enc, tag: str, gallery: list, queries: list, cfg: dict, teacher_store: Store, out_dir: Path,
                     opts: EncodeOptions) -> dict:
    """Encoder `enc` encodes the test gallery (store `out_dir/TAG.store`) and queries (`out_dir/queries_TAG.npy`);
    returns {TAG_sym: its queries against its gallery, TAG_asym: its queries against `teacher_store`}, each an
    evaluate_revisited dict, with the rankings saved as `out_dir/results/TAG_{sym,asym}.npz`."""
    opts.label = f"{tag.replace('_', ' ')} gallery"
    store = encode_to_store(enc, gallery, cfg["imlist"], out_dir / f"{tag}.store", opts, rebuild_stale=True)
    opts.label = f"{tag.replace('_', ' ')} queries"
    q = _queries(enc, queries, cfg["qimlist"], out_dir / f"queries_{tag}.npy", opts)
    results = out_dir / "results"
    results.mkdir(exist_ok=True)
    return {f"{tag}_sym": _evaluate(store, q, enc.space, cfg["gnd"], results / f"{tag}_sym.npz"),
            f"{tag}_asym": _evaluate(teacher_store, q, enc.space, cfg["gnd"], results / f"{tag}_asym.npz")}


def _real_pairs(gnd_path: Path, teacher, student, opts: EncodeOptions) -> dict[str, float]:
    """Medium mAP on the real two-view pairs (the one benchmark here whose second views are not synthetic), if built."""
    if not gnd_path.exists():
        return {}
    cfg = revisited.load_gnd(gnd_path)
    images = revisited.images_dir_for(gnd_path)
    opts.label = "real pairs"
    gallery = {name: encode_to_array(enc, revisited.gallery_items(cfg, images), opts)[0] for name, enc in
               (("teacher", teacher), ("student", student))}
    queries = {name: encode_to_array(enc, revisited.query_items(cfg, images), opts)[0] for name, enc in
               (("teacher", teacher), ("student", student))}
    settings = {"teacher_sym": ("teacher", "teacher"), "student_sym": ("student", "student"), "student_asym": ("student", "teacher")}
    out = {}
    for setting, (q, g) in settings.items():
        out[setting] = evaluate_revisited(rank_by_similarity(queries[q], gallery[g]), cfg["gnd"])["medium"]["mAP"]
    return out


def run_demo(out_dir: Path, photos: Path | None = None, student: str = STUDENT, log: Console | None = None,
             difficulty: str = "medium", seed: int = 0, train_loss: str | None = None, epochs: int = 10,
             scales: tuple[float, ...] = SCALES, adapt: bool = False) -> dict:
    """Run the demo into `out_dir`; returns {"metrics": {setting: eval dict}, "benchmark": str, "notes": [str]}.

    photos: a folder whose photographs all become test scenes; the training scenes are then the built-in
    photographs it does not hold (`photos.unseen`), so the student is tested on photographs it never saw.
    train_loss: also train the student with this loss on the training split and add the
    `student_trained_asym` and `student_trained_sym` settings. scales: the test images' scale factors
    (default: METHOD.md's multi-scale protocol 1, 1/sqrt(2), 1/2); the training images are encoded at one
    scale, as there.
    adapt: also fit the student (the trained one with train_loss) to the test gallery's own images and teacher
    vectors, label-free (training.adapt), and add `student_adapted_asym` and `student_adapted_sym`: transductive
    rows, apart from the protocol's.
    """
    from ..datasets.photos import default_photos, photos_in, unseen
    from ..datasets.views import build_views

    log = log or Console(stderr=True)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    bench = out_dir / "views"
    scene_photos = photos_in(photos) if photos else None  # a bad folder is refused before anything is said or made
    # A folder's photographs are all test scenes; the student trains on the built-in ones it does not hold.
    train_photos = unseen(default_photos(), scene_photos) if photos else None
    log.print(f"building the views benchmark in {bench}")
    build_views(bench, photos=scene_photos, difficulty=difficulty, seed=seed, train_photos=train_photos)
    gnd_path = bench / "test" / "gnd.pkl"
    cfg = revisited.load_gnd(gnd_path)
    images_dir = revisited.images_dir_for(gnd_path)
    gallery = revisited.gallery_items(cfg, images_dir)
    queries = revisited.query_items(cfg, images_dir)

    teacher = build_teacher(TEACHER)
    stu = build_student(student, teacher.dim, teacher.space, teacher=teacher.name, bridge_to=teacher)
    opts = EncodeOptions(workers=default_workers(), scales=tuple(scales))
    log.print(f"teacher {teacher.name} (D = {teacher.dim}); untrained student {stu.name}")

    opts.label = "teacher gallery"
    t_store = encode_to_store(teacher, gallery, cfg["imlist"], out_dir / "teacher.store", opts, rebuild_stale=True)
    opts.label = "teacher queries"
    q_teacher = _queries(teacher, queries, cfg["qimlist"], out_dir / "queries_teacher.npy", opts)
    results = out_dir / "results"
    results.mkdir(exist_ok=True)
    metrics = {"teacher_sym": _evaluate(t_store, q_teacher, teacher.space, cfg["gnd"], results / "teacher_sym.npz")}
    metrics |= evaluate_encoder(stu, "student", gallery, queries, cfg, t_store, out_dir, opts)
    if train_loss:
        from ..models import load_checkpoint

        log.print(f"training the student ({train_loss}, {epochs} epochs) on the benchmark's training scenes")
        trained_path = train_on_views(teacher, student, train_loss, bench, out_dir, replace(opts, scales=(1.0,)), epochs)
        metrics |= evaluate_encoder(load_checkpoint(trained_path), "student_trained", gallery, queries, cfg, t_store,
                                    out_dir, opts)
    if adapt:
        from ..models import load_checkpoint, save_checkpoint

        # Transductive: the student fits this very gallery (its images and teacher vectors, no labels), so these
        # rows sit apart from the protocol's and are never reported as its numbers.
        source = train_loss or "untrained"
        log.print(f"adapting the {source} student to the test gallery's own images (regression, {epochs} epochs, no labels)")
        init = trained_path if train_loss else save_checkpoint(stu, out_dir / f"adapt-{source}.init.safetensors")
        adapted = adapt_on_gallery(student, init, out_dir / "teacher.store", gallery, out_dir / f"adapt-{source}", opts, epochs)
        metrics |= evaluate_encoder(load_checkpoint(adapted), "student_adapted", gallery, queries, cfg, t_store, out_dir, opts)
    real_pairs = _real_pairs(bench / "pairs" / "gnd.pkl", teacher, stu, opts)
    from ..report import write_report

    shown = ["teacher_sym", "student_asym"] + (["student_trained_asym"] if train_loss else [])
    curves = out_dir / run_name(train_loss) / "log.jsonl" if train_loss else None
    report = write_report(gnd_path, [(name, results / f"{name}.npz") for name in shown], images_dir, out_dir / "report",
                          curves=curves)
    elapsed = time.perf_counter() - t0
    notes = [
        f"report: {report}",
        f"gallery {len(gallery)} images, {len(queries)} queries; benchmark in {bench}",
        f"stores: {out_dir / 'teacher.store'} (teacher), {out_dir / 'student.store'} (student); results in {results}",
        f"total time {elapsed:.0f} s",
    ]
    if real_pairs:
        notes.insert(1, "real two-view pairs (opencv-doc), Medium mAP: " + ", ".join(f"{k} {v:.1f}" for k, v in real_pairs.items()))
    return {"metrics": metrics, "benchmark": f"views ({bench})", "notes": notes, "seconds": elapsed, "real_pairs": real_pairs}
