"""The `engine report` command function (registered on the typer app in engine/cli/__init__.py)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from ..errors import EngineError
from .options import output_folder


def report(
    gnd: Path = typer.Option(..., "--gnd", help="Revisited-format ground truth .pkl"),
    results: list[Path] = typer.Option(..., "--results", help="Search result RESULT.npz (repeat to compare; the first is the reference)"),
    labels: Optional[list[str]] = typer.Option(None, "--label", help="A name per --results, in order (default: file names)"),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of <name>.jpg images (default: jpg/ beside the ground truth)"),
    out_dir: Path = typer.Option(Path("report"), "--out", help="Report folder: index.html, thumbs/, plots/"),
    top_n: int = typer.Option(10, "--top", min=1, help="Hits shown per query"),
    curves: Optional[Path] = typer.Option(None, "--curves", help="Training log, JSON lines of {epoch, loss, val_asym_mAP, val_sym_mAP}"),
    speed: Optional[Path] = typer.Option(None, "--speed", help="JSON list of {label, images_per_s, mAP} for the speed/accuracy chart"),
):
    """A static HTML report: metrics, precision-recall and other plots, and every query's top hits."""
    output_folder(out_dir)
    from ..report import write_report

    labels = labels or [p.stem for p in results]
    if len(labels) != len(results):
        raise EngineError(f"{len(labels)} --label for {len(results)} --results: give one per result set or none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = write_report(gnd, list(zip(labels, results)), images, out_dir, top_n=top_n, curves=curves, speed=speed)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {index}", file=sys.stderr)
