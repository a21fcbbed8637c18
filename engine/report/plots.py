"""The report's charts as PNG bytes (matplotlib's Agg canvas; no pyplot global state, no display)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from ..evaluate import PROTOCOLS


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def pr_plot(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray, float]]]) -> bytes:
    """Precision-recall, one panel per protocol, one line per result set.

    curves: {label: {protocol: (recall, precision, mAP in percent)}} for the protocols in PROTOCOLS.
    """
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, len(PROTOCOLS), sharey=True)
    for ax, proto in zip(axes, PROTOCOLS):
        for label, per in curves.items():
            rec, prec, m = per[proto]
            ax.plot(rec, prec, label=f"{label} (mAP {m:.1f})", linewidth=2)
        ax.set(title=proto.capitalize(), xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("interpolated precision")
    return _png(fig)


def speed_plot(rows: Sequence[Mapping]) -> bytes:
    """mAP (percent) against query-encoding images/s, one labelled point per row of `load_speed`."""
    fig = Figure(figsize=(4.2, 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.array([r["images_per_s"] for r in rows])
    y = np.array([r["mAP"] for r in rows])
    ax.scatter(x, y, s=40, zorder=3)
    for r in rows:
        ax.annotate(r["label"], (r["images_per_s"], r["mAP"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if x.max() / x.min() > 10:  # speeds across orders of magnitude read better on a log axis
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(0.2)  # room for the point labels
    ax.set(xlabel="query encoding (images/s)", ylabel="mAP (%)", title="speed / accuracy")
    ax.grid(alpha=0.3)
    return _png(fig)


def training_plot(rows: Sequence[Mapping]) -> bytes:
    """Loss and validation mAP (asymmetric, symmetric) per epoch from `load_training_log` rows."""
    fig = Figure(figsize=(6.6, 3.2), layout="constrained")
    ax_loss, ax_map = fig.subplots(1, 2)
    epoch = np.array([r["epoch"] for r in rows])
    for ax, keys, ylabel in ((ax_loss, ("loss",), "loss"), (ax_map, ("val_asym_mAP", "val_sym_mAP"), "validation mAP (%)")):
        for key in keys:
            v = np.array([r[key] for r in rows])
            ok = ~np.isnan(v)
            if ok.any():
                ax.plot(epoch[ok], v[ok], marker="o", markersize=3, label=key)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in the log", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle("training")
    return _png(fig)
