"""The tables of bench/gpu_check.sh as markdown: its pytest-benchmark JSON files (encode, search) and the head's
own markdown (bench_head.txt, printed by bench/bench_head.py).

Run: `python bench/gpu_report.py OUT_DIR` (gpu_check.sh does); a file that is missing or unreadable is said so.
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


def encode(runs: dict) -> list[str]:
    grid, pairs, pipes = [], [], []
    for b in runs["benchmarks"]:
        e = b["extra_info"]
        if "images_per_s" in e:
            grid.append([e["model"], e["side"], e["batch"], e["images_per_s"]])
        elif "speedup" in e:
            pairs.append([e["student"], e["batch"], e["student_images_per_s"], e["teacher_images_per_s"], f"{e['speedup']}x"])
        elif "pipeline_vs_bare" in e:
            host = (f"{e['host_images_per_s']} ({e['host_vs_bare']}x)" if "host_vs_bare" in e else "-")
            pipes.append([e["model"], e["side"], e["images"], e["workers"], e["pipeline_images_per_s"], host,
                          e["bare_images_per_s"], f"{e['pipeline_vs_bare']}x", e.get("device_decode_max_abs_diff", "-")])
    return (["Encoding, torch backend, float32, channels_last (random pixels, forward + copy of the vectors back):", ""]
            + table(["model", "side", "batch", "images/s"], grid)
            + ["", "Student vs the ResNet-101 teacher (eager, NCHW), 362 px:", ""]
            + table(["student", "batch", "student images/s", "teacher images/s", "speedup"], pairs)
            + ["", "`engine encode` pipeline (JPEGs decoded on the device by default, or by --decode host) vs the bare "
               "forward:", ""]
            + table(["model", "side", "images", "reading threads", "pipeline images/s", "--decode host images/s (ratio)",
                     "bare images/s", "pipeline / bare", "max |device - host decoded vector|"], pipes))


def search(runs: dict) -> list[str]:
    rows = []
    for b in runs["benchmarks"]:
        e = b["extra_info"]
        for m, r in e["methods"].items():
            recall = f" ({r['recall']:.3f})" if r["recall"] < 0.9995 else ""
            bound = (f"{r['device_bound_qps']:.4g} ({r['qps'] / r['device_bound_qps']:.2f})"
                     if "device_bound_qps" in r else "-")
            rows.append([e["N"], e["D"], e["Q"], m, f"{r['qps']:.4g}{recall}", f"{r['GBps']:.1f}", bound])
    return ["Search, k = 100, medians of interleaved rounds; queries/s (recall@100 when below 1); device bound: the "
            "float16 copy read once at the device's measured read bandwidth, as queries/s (the fraction reached):",
            ""] + table(["N", "D", "Q", "method", "queries/s", "GB/s", "device bound q/s (fraction)"], rows)


def main(out: Path) -> str:
    lines = []
    try:
        lines += [(out / "bench_head.txt").read_text().strip(), ""]
    except OSError:
        lines += ["bench_head.txt: missing (that step did not run)", ""]
    for name, render in (("encode", encode), ("search", search)):
        runs = load(out, name)
        if runs is None:
            lines += [f"bench_{name}.json: missing or unreadable (that step failed or timed out)", ""]
            continue
        lines += [f"{runs['datetime']}, host CPU {runs['machine_info'].get('cpu', {}).get('brand_raw', '')}", ""]
        try:
            lines += render(runs) + [""]
        except (KeyError, TypeError, ValueError) as e:  # one malformed record must not hide the other tables
            lines += [f"bench_{name}.json: could not be tabled ({type(e).__name__}: {e})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
