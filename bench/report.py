"""The benchmark suites' one report: per-method records, the terminal table, plots, RESULTS.md sections.

A suite describes each timed method of a case as one record (a dict, schema SCHEMA) through the `bench_report`
fixture of bench/conftest.py; the record lands in the benchmark's extra_info["report"] (so in
`--benchmark-json`), in the terminal table printed at the end of the run, in `<bench-out>/<suites>.json` and in
the plots beside it. Record fields:
  suite, case (str), params (dict: the case's sizes, the bounds measured), method, baseline (the method of the same
  case every ratio is to), unit ("queries/s", "images/s", "calls/s"), rate (median over rounds), ratio (rate over
  the baseline's: of the medians of the same interleaved rounds, or of separate benchmarks when a suite times its
  methods apart; None when the case has no baseline), ratio_rounds ([lo, hi] of one round's ratios, interleaved
  suites only), bound_fraction (the fraction of the measured memory or compute bound reached, None when unmeasured),
  bound_kind ("memory" / "compute"), recall (None when not a search), spread ((max - min) / median of the round
  times), rounds (seconds per round).
A new suite plugs in with `bench_report.add(benchmark, suite, case, [record(...), ...])`.

Run as a script: `python bench/report.py --update-results RUN.json [--results bench/RESULTS.md]` rewrites, in
RESULTS.md, the section of each suite found in RUN.json (a `--benchmark-json` file or a `<bench-out>` report).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

SCHEMA = 1
RESULTS = Path(__file__).with_name("RESULTS.md")
# RESULTS.md titles of the generated sections: apart from the hand-written ones, which an update never touches.
SECTIONS = {"search": "Search: recorded run", "encode": "Encoding: recorded run", "head": "Descriptor head: recorded run",
            "serve": "Serving: recorded run"}


def machine() -> str:
    """The CPU's model name and logical CPU count, e.g. 'Intel(R) Xeon(R) ..., 2 logical CPUs'."""
    name = None
    try:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    except OSError:
        pass
    return f"{name or platform.processor() or 'unknown CPU'}, {os.cpu_count()} logical CPUs"


def spread(times: list[float]) -> float:
    """(max - min) / median of a method's round times: 0.1 means the rounds ranged over 10 % of the median."""
    return (max(times) - min(times)) / statistics.median(times) if times else 0.0


def record(method: str, rate: float, times: list[float], *, baseline: str | None, unit: str,
           ratio: float | None = None, ratio_rounds: list[float] | None = None, bound_fraction: float | None = None,
           bound_kind: str | None = None, recall: float | None = None) -> dict:
    """One method's figures (see the module docstring); suite, case and params are filled in by `add`."""
    return {"method": method, "baseline": baseline, "unit": unit, "rate": rate, "ratio": ratio,
            "ratio_rounds": ratio_rounds, "bound_fraction": bound_fraction, "bound_kind": bound_kind,
            "recall": recall, "spread": spread(times), "rounds": list(times)}


def interleaved_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, list[float]]]:
    """For round times of methods run in the same rounds (name -> seconds per round): each method's ratio of
    median rates to the baseline's, and the [lo, hi] range of one round's ratio."""
    base = times[baseline]
    out = {}
    for m, t in times.items():
        per_round = [tb / ta for ta, tb in zip(t, base)]
        out[m] = (statistics.median(base) / statistics.median(t), [min(per_round), max(per_round)])
    return out


def fill_ratios(records: list[dict]) -> None:
    """Give every record without a ratio the ratio of its rate to its case's baseline record (suites that time
    their methods as separate benchmarks); a case whose baseline did not run keeps None."""
    rates = {(r["suite"], r["case"], r["method"]): r["rate"] for r in records}
    for r in records:
        base = rates.get((r["suite"], r["case"], r["baseline"]))
        if r["ratio"] is None and base:
            r["ratio"] = r["rate"] / base


def rate_text(rate: float) -> str:
    """A rate as read in a table: whole numbers from 100 up, three significant digits below."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def common_params(records: list[dict]) -> str:
    """The params that every record of `records` shares (k, the measured bounds, the device...) as 'k=v, ...'."""
    shared = dict(records[0]["params"])
    for r in records[1:]:
        shared = {k: v for k, v in shared.items() if r["params"].get(k) == v}
    return ", ".join(f"{k}={v}" for k, v in shared.items() if not isinstance(v, (list, dict)))


def cells(records: list[dict]) -> list[list[str]]:
    """The table as text cells: a header, then one row per record (method of a case); '-' where a figure is absent."""
    header = ["suite", "case", "method", "rate", "unit", "vs base", "rounds vs base", "bound", "recall", "spread"]
    rows = []
    for r in records:
        base, rr = r["method"] == r["baseline"], r["ratio_rounds"]
        rows.append([r["suite"], r["case"], r["method"], rate_text(r["rate"]), r["unit"],
                     "base" if base else "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                     "-" if base or not rr else f"{rr[0]:.2f}-{rr[1]:.2f}x",
                     "-" if r["bound_fraction"] is None else f"{r['bound_fraction']:.2f} {r['bound_kind']}",
                     "-" if r["recall"] is None or r["recall"] >= 0.9995 else f"{r['recall']:.4f}",
                     f"{100 * r['spread']:.0f}%"])
    return [header, *rows]


def table(records: list[dict]) -> list[str]:
    """The terminal table: one line per method of each case, columns aligned."""
    rows = cells(records)
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]


LEGEND = ("rate: median over the rounds; vs base: rate / the baseline's (the case's row marked 'base': faiss-flat "
          "for search, eager for head, the bare forward or torch for encode); rounds vs base: the range of one "
          "round's ratio (methods interleaved round by round); bound: the fraction of the measured memory-read or "
          "compute bound reached; recall: recall@k when below 1; spread: (max - min) / median of the round times.")


def sections(records: list[dict], meta: dict) -> dict[str, str]:
    """RESULTS.md sections, one per suite of `records` (title line -> whole section): the run's date, machine,
    command and shared figures, the legend, and the table as markdown."""
    out = {}
    for suite in dict.fromkeys(r["suite"] for r in records):
        ours = [r for r in records if r["suite"] == suite]
        header, *rows = cells(ours)
        title = f"## {SECTIONS.get(suite, suite)}"
        out[title] = "\n".join(
            [title, "", f"{meta['date']}, {meta['machine']}; `{meta['command']}`; {common_params(ours)}.", "", LEGEND, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows]) + "\n\n"
    return out


def update_results(records: list[dict], meta: dict, results: Path = RESULTS) -> None:
    """Replace (or append) each suite's generated section of `results`, leaving every other section as it is."""
    from engine.files import write_text

    text = results.read_text() if results.exists() else "# Benchmark results\n"
    for title, section in sections(records, meta).items():
        pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
        text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    write_text(results, text.rstrip("\n") + "\n")


def meta_now(command: str = "") -> dict:
    """The schema, machine, date (UTC, ISO 8601) and command (with its AML_* environment) of a run."""
    return {"schema": SCHEMA, "machine": machine(), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def load(path: Path) -> tuple[list[dict], dict]:
    """The records and (schema, machine, date) of a run: a `--benchmark-json` file or a `<bench-out>` report."""
    data = json.loads(Path(path).read_text())
    if "benchmarks" in data:
        reports = [b["extra_info"]["report"] for b in data["benchmarks"] if "report" in b.get("extra_info", {})]
        if not reports:
            raise SystemExit(f"{path}: no benchmark carries extra_info.report (run with bench/conftest.py)")
        records = [r for rep in reports for r in rep["records"]]
        meta = {k: reports[0][k] for k in ("schema", "machine", "date", "command")}
    else:
        records, meta = data["records"], {k: data[k] for k in ("schema", "machine", "date", "command")}
    if meta["schema"] != SCHEMA:
        raise SystemExit(f"{path}: report schema {meta['schema']}, this script reads {SCHEMA}")
    return records, meta


def plot_search(records: list[dict], out: Path) -> list[Path]:
    """queries/s against Q, log axes, one line per method, one PNG per (N, D): search-N<N>-D<D>.png. Bounds drawn:
    a float32 scan's, Q / max(4 N D / read bandwidth, 2 Q N D / fp32 peak), and an int8 scan's memory bound,
    Q / (N D / read bandwidth) (its compute peak is not measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_nd: dict = {}
    for r in records:
        if r["suite"] == "search":
            by_nd.setdefault((r["params"]["N"], r["params"]["D"]), []).append(r)
    for (n, d), rs in by_nd.items():
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        qs = sorted({r["params"]["Q"] for r in rs})
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = sorted((r["params"]["Q"], r["rate"]) for r in rs if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", label=m)
        p = rs[0]["params"]
        grid = [qs[0] * (qs[-1] / qs[0]) ** (i / 50) for i in range(51)] if len(qs) > 1 else qs
        memory = lambda nbytes: n * d * nbytes / (p["mem_read_GBps"] * 1e9)  # noqa: E731  seconds per scan
        fp32 = [q / max(memory(4), 2 * q * n * d / (p["fp32_peak_GFLOPs"] * 1e9)) for q in grid]
        ax.plot(grid, fp32, "k-", lw=1, label="bound of a float32 scan (memory read or fp32 peak)")
        ax.plot(grid, [q / memory(1) for q in grid], "k:", lw=1, label="memory bound of an int8 scan")
        ax.set(xscale="log", yscale="log", xlabel="Q (queries per call)", ylabel="queries/s",
               title=f"top-{p['k']} search, N = {n}, D = {d}")
        # The int8 memory bound grows with Q without limit (its compute peak is unmeasured): keep the data readable.
        rates = [r["rate"] for r in rs]
        ax.set_ylim(min(rates + fp32) / 2, 4 * max(rates + fp32))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a line
        fig.tight_layout()
        paths.append(out / f"search-N{n}-D{d}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def plot_rates(records: list[dict], suite: str, out: Path) -> list[Path]:
    """A bar chart of each case's methods' rates (encode: images/s per encoder and backend): <suite>.png."""
    rs = [r for r in records if r["suite"] == suite]
    if not rs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rs))
    methods = list(dict.fromkeys(r["method"] for r in rs))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4.5))
    for i, m in enumerate(methods):
        pts = [(cases.index(r["case"]), r["rate"]) for r in rs if r["method"] == m]
        ax.bar([c + (i - (len(methods) - 1) / 2) * width for c, _ in pts], [v for _, v in pts], width, label=m)
    ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=7)
    ax.set(ylabel=rs[0]["unit"], title=f"{suite}: {rs[0]['unit']} per case and method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_outputs(records: list[dict], meta: dict, out: Path) -> list[Path]:
    """The report JSON (<suites>.json: meta + records) and the plots under `out`; returns the paths written."""
    from engine.files import write_text

    out.mkdir(parents=True, exist_ok=True)
    suites = list(dict.fromkeys(r["suite"] for r in records))
    path = out / f"{'-'.join(suites)}.json"
    write_text(path, json.dumps({**meta, "records": records}, indent=1) + "\n")
    paths = [path] + plot_search(records, out)
    for suite in suites:
        if suite != "search":
            paths += plot_rates(records, suite, out)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update-results", metavar="RUN.json", type=Path, required=True,
                        help="a --benchmark-json file or a <bench-out>/<suites>.json report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to update")
    args = parser.parse_args(argv)
    records, meta = load(args.update_results)
    fill_ratios(records)
    update_results(records, meta, args.results)
    print(f"{args.results}: updated the {', '.join(dict.fromkeys(r['suite'] for r in records))} section(s)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine/, when run from elsewhere
    main()
