"""Per-method changes between two benchmark runs (two commits, or two machines).

Run: `python bench/compare.py A.json B.json [--threshold 0.1]`, each a `--benchmark-json` file or a
`<bench-out>/<suites>.json` report (bench/report.py's schema). One row per (suite, case, method) found in both:
the rate in A and in B, B / A, and the ratio to the case's baseline in A and in B (the ratio moves less with the
machine's load than the rate does). Rows whose rate changed by more than the threshold are flagged; methods
found in only one run are listed after. pytest-benchmark's own `compare` sees whole benchmarks only (a round of
every method together), not the methods inside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py beside this file, from any directory

import report  # noqa: E402


def compare(a: list[dict], b: list[dict], threshold: float) -> list[str]:
    """The lines of the comparison of two runs' records (see the module docstring)."""
    key = lambda r: (r["suite"], r["case"], r["method"])  # noqa: E731
    ra, rb = {key(r): r for r in a}, {key(r): r for r in b}
    header = ["suite", "case", "method", "rate A", "rate B", "B / A", "vs base A", "vs base B", ""]
    rows = []
    for k in [k for k in ra if k in rb]:
        x, y = ra[k], rb[k]
        change = y["rate"] / x["rate"]
        flag = "" if abs(change - 1) <= threshold else ("faster" if change > 1 else "SLOWER")
        rows.append([*k, report.rate_text(x["rate"]), report.rate_text(y["rate"]), f"{change:.2f}x",
                     "-" if x["ratio"] is None else f"{x['ratio']:.2f}x", "-" if y["ratio"] is None else f"{y['ratio']:.2f}x",
                     flag])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    for name, only in (("A", [k for k in ra if k not in rb]), ("B", [k for k in rb if k not in ra])):
        lines += [f"only in {name}: {' '.join(k)}" for k in only]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the earlier run (a --benchmark-json file or a bench-out report)")
    parser.add_argument("b", type=Path, help="the later run")
    parser.add_argument("--threshold", type=float, default=0.1, help="flag rate changes beyond this fraction (0.1: 10%%)")
    args = parser.parse_args(argv)
    (a, meta_a), (b, meta_b) = report.load(args.a), report.load(args.b)
    report.fill_ratios(a), report.fill_ratios(b)
    print(f"A: {args.a} ({meta_a['date']}, {meta_a['machine']})\nB: {args.b} ({meta_b['date']}, {meta_b['machine']})")
    print("\n".join(compare(a, b, args.threshold)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
