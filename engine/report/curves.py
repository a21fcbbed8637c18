"""Precision-recall curves under the revisited protocols (same ignored-image rule as `engine.evaluate`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..evaluate import positive_ranks, protocol_labels


def precision_recall(
    ranks: np.ndarray, gnd: Sequence[dict], protocol: str, recall: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision-recall curve of a ranking under one protocol.

    ranks: (n_ranked, n_queries) gallery indices best first, as in `engine.evaluate`.
    recall: the recall levels (default 101 points in [0, 1]).
    Returns (recall, precision), float64 arrays of the same length: at each level, the mean over
    queries with positives of the best precision at that recall or beyond (0 where the ranking,
    possibly a top-k prefix, never reaches it). All zeros when no query has positives.
    """
    recall = np.linspace(0.0, 1.0, 101) if recall is None else np.asarray(recall, dtype=np.float64)
    curves = []
    for q, entry in enumerate(gnd):
        positives, ignored = protocol_labels(entry, protocol)
        if len(positives) == 0:
            continue
        pos = positive_ranks(ranks[:, q], positives, ignored)
        if len(pos) == 0:
            curves.append(np.zeros_like(recall))
            continue
        j = np.arange(1, len(pos) + 1)
        prec = j / (pos + 1.0)
        rec = j / len(positives)
        # Interpolated precision: best precision at any recall >= level (a running max from the right).
        best = np.maximum.accumulate(prec[::-1])[::-1]
        idx = np.searchsorted(rec, recall - 1e-12, side="left")
        curves.append(np.where(idx < len(best), best[np.minimum(idx, len(best) - 1)], 0.0))
    if not curves:
        return recall, np.zeros_like(recall)
    return recall, np.mean(curves, axis=0)
