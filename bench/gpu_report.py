"""The tables of bench/gpu_check.sh: its pytest-benchmark JSON files (head, encode, search) as markdown.

Run: `python bench/gpu_report.py OUT_DIR` (gpu_check.sh does); a file that is missing is said so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    """A step's JSON, or None when the step wrote none (or an unfinished one)."""
    try:
        return json.loads((out / f"bench_{name}.json").read_text())
    except (OSError, ValueError):
        return None


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def head(runs: dict) -> list[str]:
    rows = []
    for b in runs["benchmarks"]:
        case, backend = b["param"].rsplit("-", 1)
        s, e = b["stats"], b["extra_info"]
        rows.append([case, backend, f"{s['median'] * 1e6:.1f}", e["gb_per_s"], e.get("gpu_us", "-"), e.get("graph_us") or "-",
                     e.get("bound_us", "-"), f"{e['x_bound']}x" if "x_bound" in e else "-",
                     f"{e['graph_x_bound']}x" if e.get("graph_x_bound") else "-"])
    return (["Descriptor head: wall time per call including launches and a synchronize; GPU time (do_bench: CUDA "
             "events, launched from Python) and as a CUDA graph replay, against the memory bound (bytes read at the "
             "measured read bandwidth):", ""]
            + table(["case", "backend", "wall us", "wall GB/s", "GPU us", "graph us", "bound us", "GPU / bound",
                     "graph / bound"], rows))


def encode(runs: dict) -> list[str]:
    grid, pairs, pipes = [], [], []
    for b in runs["benchmarks"]:
        e = b["extra_info"]
        if "images_per_s" in e:
            grid.append([e["model"], e["side"], e["batch"], e["images_per_s"]])
        elif "speedup" in e:
            pairs.append([e["student"], e["batch"], e["student_images_per_s"], e["teacher_images_per_s"], f"{e['speedup']}x"])
        elif "pipeline_vs_bare" in e:
            pipes.append([e["model"], e["side"], e["images"], e["workers"], e["pipeline_images_per_s"], e["bare_images_per_s"],
                          f"{e['pipeline_vs_bare']}x"])
    return (["Encoding, torch backend, float32, channels_last (random pixels, forward + copy of the vectors back):", ""]
            + table(["model", "side", "batch", "images/s"], grid)
            + ["", "Student vs the ResNet-101 teacher (eager, NCHW), 362 px:", ""]
            + table(["student", "batch", "student images/s", "teacher images/s", "speedup"], pairs)
            + ["", "`engine encode` pipeline (JPEG decoding threads + forward + store) vs the bare forward:", ""]
            + table(["model", "side", "images", "decoding threads", "pipeline images/s", "bare images/s", "ratio"], pipes))


def search(runs: dict) -> list[str]:
    rows = []
    for b in runs["benchmarks"]:
        e = b["extra_info"]
        for m, r in e["methods"].items():
            recall = f" ({r['recall']:.3f})" if r["recall"] < 0.9995 else ""
            rows.append([e["N"], e["D"], e["Q"], m, f"{r['qps']:.4g}{recall}", f"{r['GBps']:.1f}"])
    return ["Search, k = 100, medians of interleaved rounds; queries/s (recall@100 when below 1):", ""] + table(
        ["N", "D", "Q", "method", "queries/s", "GB/s"], rows)


def main(out: Path) -> str:
    lines = []
    for name, render in (("head", head), ("encode", encode), ("search", search)):
        runs = load(out, name)
        if runs is None:
            lines += [f"bench_{name}.json: missing or unreadable (that step failed or timed out)", ""]
            continue
        if name == "head":
            machine = runs["machine_info"].get("cpu", {}).get("brand_raw", "")
            lines += [f"{runs['datetime']}, host CPU {machine}", ""]
        lines += render(runs) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
