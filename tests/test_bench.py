"""The benchmark report (bench/conftest.py, bench/report.py, bench/compare.py) on a tiny search grid: a row per method
in the terminal, the per-method JSON schema, a real plot, the explicit RESULTS.md step, and no tracked file touched."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import median

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GRID = "3000x32x1,3000x32x8"
METHODS = ["engine-float32", "engine-int8", "faiss-flat"]  # at least these: the rows a reader compares


def git_status() -> str | None:
    """`git status --porcelain` of the checkout, or None where this is not a git checkout."""
    if shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny search benchmark, run as a user would (a pytest subprocess in the checkout): its outputs."""
    pytest.importorskip("faiss")
    pytest.importorskip("pytest_benchmark")
    tmp = tmp_path_factory.mktemp("bench")
    before = git_status()
    env = {**os.environ, "AML_BENCH_GRID": GRID, "AML_BENCH_ROUNDS": "2", "AML_BENCH_PROBE_MIB": "32"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/bench_search.py", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "--bench-out", str(tmp / "out"), "--benchmark-json", str(tmp / "run.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "stdout": proc.stdout, "before": before, "after": git_status()}


def test_terminal_has_a_row_per_method_with_rate_and_ratio(run):
    for case in ("N3000-D32-Q1", "N3000-D32-Q8"):
        rows = {m: re.search(rf"^search\s+{case}\s+{m}\s+(\S+)\s+queries/s\s+(\S+)", run["stdout"], re.M) for m in METHODS}
        assert all(rows.values()), (case, run["stdout"][-4000:])
        assert rows["faiss-flat"].group(2) == "base"
        for m in ("engine-float32", "engine-int8"):
            assert float(rows[m].group(1)) > 0 and re.fullmatch(r"\d+\.\d\dx", rows[m].group(2))


def test_json_carries_every_method_in_the_schema(run):
    data = json.loads((run["tmp"] / "run.json").read_text())
    assert len(data["benchmarks"]) == 2
    for b in data["benchmarks"]:
        rep = b["extra_info"]["report"]
        assert rep["schema"] == 1 and rep["machine"] and re.match(r"\d{4}-\d\d-\d\dT", rep["date"])
        assert "AML_BENCH_GRID=" + GRID in rep["command"]
        by = {r["method"]: r for r in rep["records"]}
        assert set(METHODS) <= set(by)
        for r in by.values():
            assert r["suite"] == "search" and r["baseline"] == "faiss-flat" and r["unit"] == "queries/s"
            assert r["rate"] > 0 and r["ratio"] > 0 and len(r["rounds"]) == 2 and r["spread"] >= 0
            assert (r["bound_fraction"] is None) == (r["bound_kind"] is None) and 0 < r["recall"] <= 1
            assert {"N", "D", "Q", "mem_read_GBps", "fp32_peak_GFLOPs"} <= set(r["params"])
        for m in ("engine-float32", "faiss-flat"):  # float32 arithmetic: the longer of the memory and compute times
            row, p = b["extra_info"]["methods"][m], by[m]["params"]
            fractions = {"memory": row["GBps"] / p["mem_read_GBps"], "compute": row["GFLOPs"] / p["fp32_peak_GFLOPs"]}
            assert by[m]["bound_kind"] == max(fractions, key=fractions.get)
            assert by[m]["bound_fraction"] == pytest.approx(max(fractions.values()))
        assert by["faiss-flat"]["ratio"] == pytest.approx(1.0)
        assert by["engine-float32"]["recall"] == 1.0
        # the same rounds: ratio of medians from the round times themselves
        assert by["engine-int8"]["ratio"] == pytest.approx(median(by["faiss-flat"]["rounds"]) / median(by["engine-int8"]["rounds"]))
    # the bench-out report holds the same records
    report = json.loads((run["tmp"] / "out" / "search.json").read_text())
    assert report["schema"] == 1 and len(report["records"]) == sum(len(b["extra_info"]["report"]["records"]) for b in data["benchmarks"])


def test_plot_is_a_real_image(run):
    path = run["tmp"] / "out" / "search-N3000-D32.png"
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


def test_no_tracked_file_changed(run):
    if run["before"] is None:
        pytest.skip("not a git checkout")
    assert run["after"] == run["before"]


def test_update_results_and_compare_are_explicit_steps(run, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Search\n\nhand-written notes\n\n## Other\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "bench" / "report.py"), "--update-results", str(run["tmp"] / "run.json"),
           "--results", str(results)]
    for _ in range(2):  # a second update replaces its section, never appends a copy
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    text = results.read_text()
    assert text.count("## Search: recorded run") == 1 and "hand-written notes" in text and "## Other\n\nkept" in text
    assert re.search(r"^\| search \| N3000-D32-Q8 \| engine-int8 \| \d+ \| queries/s \| \d+\.\d\dx \|", text, re.M)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), str(run["tmp"] / "run.json"),
                          str(run["tmp"] / "out" / "search.json")], check=True, capture_output=True, text=True).stdout
    for m in METHODS:  # one run against its own report: every method present, unchanged
        assert re.search(rf"^search\s+N3000-D32-Q1\s+{m}\s+\S+\s+\S+\s+1\.00x", out, re.M), out
