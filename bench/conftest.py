"""The benchmark suites' shared report (bench/report.py): options, the `bench_report` fixture, the end-of-run table.

Options: `--bench-out DIR` (default ./bench-out, git-ignored): the run's report JSON and plots land there, never in
a tracked file; `--update-results`: also rewrite this run's suites' sections of bench/RESULTS.md (the explicit
step for recording figures; `python bench/report.py --update-results RUN.json` does the same from a saved run).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

import report

RECORDS = pytest.StashKey[list]()
OUTPUTS = pytest.StashKey[list]()
META = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("bench", "benchmark reports (bench/report.py)")
    group.addoption("--bench-out", default="bench-out", metavar="DIR",
                    help="folder for the run's report JSON and plots (default: ./bench-out)")
    group.addoption("--update-results", action="store_true", default=False,
                    help="rewrite this run's suites' sections of bench/RESULTS.md (for recording figures)")


def pytest_configure(config):
    config.stash[RECORDS] = []
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("AML_")]
    config.stash[META] = report.meta_now(" ".join(env + ["pytest", *map(shlex.quote, sys.argv[1:])]))


class Reporter:
    """What a suite calls once per benchmark: add(benchmark, suite, case, records, **params)."""

    def __init__(self, records: list[dict], meta: dict):
        self.records = records
        self.meta = meta

    def add(self, benchmark, suite: str, case: str, records: list[dict], **params) -> None:
        """Stamp `records` (report.record dicts) with suite, case and params, keep them for the table, and put
        them with the schema, machine and date into benchmark.extra_info["report"]."""
        for r in records:
            r.update(suite=suite, case=case, params=params)
        self.records += records
        benchmark.extra_info["report"] = {**self.meta, "records": records}


@pytest.fixture(scope="session")
def bench_report(request) -> Reporter:
    return Reporter(request.config.stash[RECORDS], request.config.stash[META])


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    # Before pytest-benchmark's own hook saves --benchmark-json: ratios across separate benchmarks go in too.
    records = session.config.stash[RECORDS]
    report.fill_ratios(records)
    if records:
        meta = session.config.stash[META]
        session.config.stash[OUTPUTS] = report.write_outputs(records, meta, Path(session.config.getoption("bench_out")))
        if session.config.getoption("update_results"):
            report.update_results(records, meta)
    yield


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's table of whole rounds: the last thing on the screen
def pytest_terminal_summary(terminalreporter, config):
    records = config.stash[RECORDS]
    if not records:
        return
    terminalreporter.section("benchmark report: every method of every case")
    for suite in dict.fromkeys(r["suite"] for r in records):
        terminalreporter.write_line(f"{suite}: {report.common_params([r for r in records if r['suite'] == suite])}")
    for line in report.table(records):
        terminalreporter.write_line(line)
    terminalreporter.write_line(report.LEGEND)
    for path in config.stash.get(OUTPUTS, []):
        terminalreporter.write_line(f"wrote {path}")
    if config.getoption("update_results"):
        terminalreporter.write_line(f"updated {report.RESULTS}")
