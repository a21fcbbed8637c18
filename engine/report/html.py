"""Render the report page from plain data: one HTML string with its CSS and JS inlined.

The page model (built by `build.write_report`):
  {"title": str, "info": [str], "warnings": [str], "top_n": int,
   "runs": [label, ...],
   "metrics": {label: engine.evaluate.evaluate_revisited(...)},   # percent
   "plots": [{"title": str, "png": bytes, "file": relative path}],
   "queries": [{"index": int, "name": str, "thumb": relative path | None,
                "runs": [{"ap": {protocol: fraction or NaN},
                          "hits": [{"id": int, "name": str, "thumb": relative path | None,
                                    "label": "easy" | "hard" | "junk" | "neg", "score": float}]}]}]}
"""
from __future__ import annotations

import base64
import math
from functools import cache
from html import escape
from pathlib import Path

from ..evaluate import DEFAULT_KAPPAS, PROTOCOLS

ASSETS = Path(__file__).parent
LABEL_TEXT = {"easy": "easy positive", "hard": "hard positive", "junk": "junk", "neg": "negative"}
LABEL_TAG = {"easy": "E", "hard": "H", "junk": "J", "neg": "✗"}  # the label without relying on colour
DEFAULT_PROTOCOL = "medium"


@cache
def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


def _attr(value: float) -> str:
    """Full precision for data attributes (the tests and the JS read them back)."""
    return "nan" if math.isnan(value) else repr(float(value))


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.2f}"


def _image(thumb: str | None, name: str, cls: str) -> str:
    if thumb is None:
        return f'<div class="{cls} missing" title="image missing: {escape(name)}">missing<br>{escape(name)}</div>'
    return f'<img class="{cls}" src="thumbs/{escape(thumb)}" alt="{escape(name)}" loading="lazy">'


def metrics_table(runs: list[str], metrics: dict[str, dict]) -> str:
    """The mAP and mP@k table: one row per result set, a column group per protocol; best mAP in bold."""
    ks = [f"mP@{k}" for k in DEFAULT_KAPPAS]
    head1 = "".join(f'<th colspan="{1 + len(ks)}">{p.capitalize()}</th>' for p in PROTOCOLS)
    head2 = "".join(f"<th>mAP</th>{''.join(f'<th>{k}</th>' for k in ks)}" for _ in PROTOCOLS)
    best = {p: max(metrics[r][p]["mAP"] for r in runs) for p in PROTOCOLS}
    rows = []
    for r in runs:
        cells = []
        for p in PROTOCOLS:
            m = metrics[r][p]
            bold = ' class="best"' if len(runs) > 1 and m["mAP"] == best[p] else ""
            cells.append(f'<td{bold} data-map="{_attr(m["mAP"])}">{m["mAP"]:.2f}</td>')
            cells += [f"<td>{m[k]:.1f}</td>" for k in ks]
        rows.append(f'<tr><th class="run">{escape(r)}</th>{"".join(cells)}</tr>')
    return (f'<table class="metrics"><thead><tr><th rowspan="2">result set</th>{head1}</tr><tr>{head2}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _hit(rank: int, hit: dict) -> str:
    label = hit["label"]
    title = f'#{rank} {hit["name"]} · {LABEL_TEXT[label]} · score {hit["score"]:.4f}'
    return (f'<li class="hit {label}" data-id="{hit["id"]}" data-label="{label}" title="{escape(title)}">'
            f'{_image(hit["thumb"], hit["name"], "thumb")}<span class="rk">{rank}</span><span class="tag">{LABEL_TAG[label]}</span></li>')


def query_card(query: dict, runs: list[str]) -> str:
    """One query: its image with the box, then per result set its AP, Δ AP to the first set, and top hits."""
    rows = []
    for i, (label, run) in enumerate(zip(runs, query["runs"])):
        ap_attrs = " ".join(f'data-ap-{p}="{_attr(run["ap"][p])}"' for p in PROTOCOLS)
        delta = '<span class="delta"></span>' if i else ""
        hits = "".join(_hit(rank, h) for rank, h in enumerate(run["hits"], 1))
        rows.append(f'<div class="run" data-run="{i}" {ap_attrs}><div class="runhead"><span class="label">{escape(label)}</span>'
                    f' <span class="ap">AP {_pct(run["ap"][DEFAULT_PROTOCOL])}</span>{delta}</div>'
                    f'<ol class="hits">{hits}</ol></div>')
    return (f'<article class="query" data-q="{query["index"]}" data-name="{escape(query["name"])}">'
            f'<div class="qside">{_image(query["thumb"], query["name"], "qimg")}'
            f'<div class="qname">#{query["index"]} {escape(query["name"])}</div></div>'
            f'<div class="runs">{"".join(rows)}</div></article>')


def controls(runs: list[str]) -> str:
    """Protocol, sort and filter controls (wired up by page.js); comparisons are against the first set."""
    protos = "".join(f'<option value="{p}"{" selected" if p == DEFAULT_PROTOCOL else ""}>{p.capitalize()}</option>' for p in PROTOCOLS)
    sorts = ['<option value="order">query order</option>']
    filters = ['<option value="all">all queries</option>']
    buttons = []
    for i, r in enumerate(runs):
        sorts.append(f'<option value="ap:{i}:asc">AP of {escape(r)}, lowest first</option>')
        sorts.append(f'<option value="ap:{i}:desc">AP of {escape(r)}, highest first</option>')
        filters.append(f'<option value="below:{i}">AP of {escape(r)} below the threshold</option>')
        if i:
            sorts.append(f'<option value="delta:{i}">Δ AP {escape(r)} − {escape(runs[0])}, most lost first</option>')
            filters.append(f'<option value="loses:{i}">{escape(r)} loses to {escape(runs[0])}</option>')
            buttons.append(f'<button type="button" class="loses" data-run="{i}">queries where {escape(r)} loses to '
                           f'{escape(runs[0])} <span class="n"></span></button>')
    return ('<div class="controls">'
            f'<label>protocol <select id="protocol">{protos}</select></label>'
            f'<label>sort <select id="sort">{"".join(sorts)}</select></label>'
            f'<label>show <select id="filter">{"".join(filters)}</select></label>'
            '<label>threshold <input id="threshold" type="number" min="0" max="100" step="1" value="50"> %</label>'
            f'{"".join(buttons)}<span id="shown"></span></div>')


def legend() -> str:
    items = "".join(f'<span class="key {k}">{LABEL_TAG[k]} {v}</span>' for k, v in LABEL_TEXT.items())
    return (f'<div class="legend">{items}<span class="note">faded: ignored under the chosen protocol;'
            ' yellow box: the query region</span></div>')


def render(page: dict) -> str:
    """The whole page as one HTML string (thumbnails by relative path, plots as data URIs)."""
    runs = page["runs"]
    warnings = "".join(f"<li>{escape(w)}</li>" for w in page["warnings"])
    plots = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p["png"]).decode()}" alt="{escape(p["title"])}">'
        f'<figcaption>{escape(p["title"])} (<a href="{escape(p["file"])}">{escape(p["file"])}</a>)</figcaption></figure>'
        for p in page["plots"])
    cards = "".join(query_card(q, runs) for q in page["queries"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(page["title"])}</title><style>{_asset("page.css")}</style></head>
<body class="p-{DEFAULT_PROTOCOL}" data-runs="{len(runs)}">
<header><h1>{escape(page["title"])}</h1>{"".join(f"<p>{escape(line)}</p>" for line in page["info"])}</header>
{f'<ul class="warnings">{warnings}</ul>' if warnings else ""}
<section><h2>Metrics (%)</h2>{metrics_table(runs, page["metrics"])}</section>
{f'<section class="plots"><h2>Plots</h2>{plots}</section>' if plots else ""}
<section><h2>Queries: top {page["top_n"]}</h2>{controls(runs)}{legend()}<div id="queries">{cards}</div></section>
<script>{_asset("page.js")}</script>
</body></html>
"""
