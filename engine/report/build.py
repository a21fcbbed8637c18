"""`write_report`: results + ground truth + images -> report/index.html, thumbs/ and plots/."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..checks import check_int
from ..datasets.revisited import image_path, images_dir_for, load_gnd
from ..errors import EngineError
from ..evaluate import PROTOCOLS, compute_map, evaluate_revisited, ranks_from_ids
from ..files import write_bytes
from . import html, plots
from .curves import precision_recall
from .inputs import load_result, load_speed, load_training_log
from .thumbs import thumbnails

QUERY_THUMB = 192
HIT_THUMB = 128


def hit_labels(entry: dict) -> dict[int, str]:
    """Gallery id -> 'easy' | 'hard' | 'junk' for one ground-truth entry (other ids are negatives)."""
    labels: dict[int, str] = {}
    for key in ("easy", "hard", "junk"):
        for i in entry.get(key, []):
            labels.setdefault(int(i), key)
    return labels


def write_report(
    gnd_path: str | Path,
    results: Sequence[tuple[str, str | Path]],
    images_dir: str | Path | None,
    out_dir: str | Path,
    top_n: int = 10,
    curves: str | Path | None = None,
    speed: str | Path | None = None,
) -> Path:
    """Write a self-contained static HTML report of one or more search results; returns index.html's path.

    gnd_path: revisited-format ground truth .pkl. results: (label, RESULT.npz) pairs, the npz holding
    `ids` (n_queries x k int64, best first); the first set is the reference the others are compared to
    (per-query Δ AP). images_dir: the folder of `<name>.jpg` images (None: the `jpg/` beside the ground
    truth). top_n: hits shown per query. curves: optional training log (JSON lines of {epoch, loss,
    val_asym_mAP, val_sym_mAP}); speed: optional JSON list of {label, images_per_s, mAP}; absent inputs
    skip their plot. Writes out_dir/index.html, out_dir/thumbs/*.jpg (cached across runs) and
    out_dir/plots/*.png (also embedded in the page). Missing images become placeholders plus a warning.
    Raises EngineError for results that do not fit the ground truth.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EngineError("is a file: the report goes into a folder", out_dir)
    cfg = load_gnd(gnd_path)
    n_q, n_g = len(cfg["qimlist"]), len(cfg["imlist"])
    if not results:
        raise EngineError("no result sets given")
    labels = [str(label) for label, _ in results]
    if len(set(labels)) != len(labels):
        raise EngineError(f"result set labels must differ, got {labels}")
    check_int(top_n, "top_n")
    images_dir = images_dir_for(gnd_path) if images_dir is None else Path(images_dir)
    if not images_dir.is_dir():
        raise EngineError("images folder not found", images_dir)
    all_ids, all_scores = zip(*(load_result(path, n_q, n_g) for _, path in results))
    training = load_training_log(curves) if curves is not None else None
    speed_rows = load_speed(speed) if speed is not None else None

    metrics, aps, pr = {}, [], {}
    for label, ids in zip(labels, all_ids):
        ranks = ranks_from_ids(ids)
        metrics[label] = evaluate_revisited(ranks, cfg["gnd"])
        aps.append({p: compute_map(ranks, cfg["gnd"], p)[1] for p in PROTOCOLS})
        pr[label] = {p: (*precision_recall(ranks, cfg["gnd"], p), metrics[label][p]["mAP"]) for p in PROTOCOLS}

    # Thumbnails only for what the page shows: each query (box drawn) and each run's top hits.
    shown = [ids[:, :top_n] for ids in all_ids]
    requests = [(image_path(images_dir, name), cfg["gnd"][q].get("bbx"), QUERY_THUMB) for q, name in enumerate(cfg["qimlist"])]
    requests += [(image_path(images_dir, cfg["imlist"][i]), None, HIT_THUMB) for ids in shown for i in ids.ravel()]
    thumbs = thumbnails(requests, out_dir / "thumbs")
    missing = sorted({str(src) for (src, _, _), t in zip(requests, thumbs) if t is None})
    page_warnings = []
    if missing:
        msg = f"{len(missing)} image(s) missing or unreadable (first: {missing[0]}); placeholders shown"
        warnings.warn(msg, stacklevel=2)
        page_warnings.append(msg)

    queries = []
    offsets = np.cumsum([n_q] + [ids.size for ids in shown])
    for q, name in enumerate(cfg["qimlist"]):
        truth = hit_labels(cfg["gnd"][q])
        runs = []
        for r, ids in enumerate(shown):
            row_thumbs = thumbs[offsets[r] + q * ids.shape[1]: offsets[r] + (q + 1) * ids.shape[1]]
            hits = [{"id": int(i), "name": cfg["imlist"][i], "thumb": t, "label": truth.get(int(i), "neg"),
                     "score": float(all_scores[r][q, rank])}
                    for rank, (i, t) in enumerate(zip(ids[q], row_thumbs))]
            runs.append({"ap": {p: float(aps[r][p][q]) for p in PROTOCOLS}, "hits": hits})
        queries.append({"index": q, "name": name, "thumb": thumbs[q], "runs": runs})

    figures = [("precision-recall", "pr.png", plots.pr_plot(pr))]
    if speed_rows is not None:
        figures.append(("speed / accuracy", "speed.png", plots.speed_plot(speed_rows)))
    if training is not None:
        figures.append(("training curves", "training.png", plots.training_plot(training)))
    for _, file, png in figures:
        write_bytes(out_dir / "plots" / file, png)

    page = {
        "title": f"Retrieval report: {Path(gnd_path).parent.name or Path(gnd_path).name}",
        "info": [f"ground truth {gnd_path}: {n_q} queries, {n_g} gallery images; images from {images_dir}",
                 *(f"{label}: {path} (top {ids.shape[1]} per query)" for (label, path), ids in zip(results, all_ids))],
        "warnings": page_warnings,
        "top_n": top_n,
        "runs": labels,
        "metrics": metrics,
        "plots": [{"title": title, "png": png, "file": f"plots/{file}"} for title, file, png in figures],
        "queries": queries,
    }
    index = out_dir / "index.html"
    write_bytes(index, html.render(page).encode())
    return index
