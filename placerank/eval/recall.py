"""The one Recall@N of the project.

Recall@N = fraction of queries (that have at least one positive) for which at least one of the
top-N retrieved database images is a positive. Queries without any positive are excluded and
counted separately, as in the VPR literature (e.g. TUM fr1_desk: 148 of 283 queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_NS = (1, 5, 10, 20, 50, 100)


def hits_matrix(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """(Q, K) bool: is the k-th prediction of query q a positive."""
    predictions = np.asarray(predictions)
    out = np.zeros(predictions.shape, dtype=bool)
    for q, pos in enumerate(positives):
        if len(pos):
            out[q] = np.isin(predictions[q], pos)
    return out


def recall_at_n(
    predictions: np.ndarray, positives: Sequence[np.ndarray], ns: Sequence[int] = DEFAULT_NS
) -> dict[str, float]:
    """{"N": recall} for every N <= K (the number of predictions per query)."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or len(predictions) != len(positives):
        raise ValueError(f"predictions {predictions.shape} do not match {len(positives)} queries")
    has_pos = np.array([len(p) > 0 for p in positives], dtype=bool)
    if not has_pos.any():
        return {str(n): float("nan") for n in ns if n <= predictions.shape[1]}
    first_hit = hits_matrix(predictions, positives)[has_pos]
    cum = np.cumsum(first_hit, axis=1) > 0
    return {str(n): float(cum[:, n - 1].mean()) for n in ns if n <= predictions.shape[1]}


def ns_for(k: int, ns: Sequence[int] = DEFAULT_NS) -> list[int]:
    return [n for n in ns if n <= k]
