"""The one re-rank-top-K loop, used by eval, localize, the service and the benchmarks.

Each query's first ``top_k`` candidates are scored by a re-ranker against the query's local
features and re-sorted by score, ties kept in first-stage order (stable sort); candidates past
``top_k`` keep their first-stage order after them. Features come from callables, so the caller
decides where they live (the memory-mapped local-feature store, or a query extracted just now).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from placerank.models.base import LocalFeatures


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Indices that sort candidates by descending score, ties kept in first-stage order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


@dataclass
class RerankedCandidates:
    """``ids`` (Q, K') re-ordered candidates; ``scores`` (Q, top_k) re-ranker scores in the new
    order; ``ms_per_query`` the time each query's scoring took (feature reads included)."""

    ids: np.ndarray
    scores: np.ndarray
    ms_per_query: np.ndarray
    top_k: int

    def timing_summary(self) -> dict[str, float]:
        ms = self.ms_per_query if len(self.ms_per_query) else np.zeros(1)
        return {
            "ms_per_query_median": round(float(np.median(ms)), 3),
            "ms_per_query_p90": round(float(np.percentile(ms, 90)), 3),
        }


def rerank_topk(
    reranker,
    candidates: np.ndarray,
    top_k: int,
    query_features: Callable[[int], LocalFeatures],
    database_features: Callable[[int], LocalFeatures],
    progress: bool = True,
) -> RerankedCandidates:
    """Re-rank the first ``top_k`` of each row of ``candidates`` (Q, K') with ``reranker.score``.

    ``query_features(q)`` gives query ``q``'s local features and ``database_features(j)`` those of
    database image ``j``. Rows may contain ``-1`` (FAISS padding): those never move.
    """
    cand = np.asarray(candidates)
    if cand.ndim != 2:
        raise ValueError(f"candidates must be (queries, K), got shape {cand.shape}")
    k = max(0, min(int(top_k), cand.shape[1]))
    ids = cand.copy()
    scores = np.zeros((len(cand), k), dtype=np.float64)
    ms = np.zeros(len(cand), dtype=np.float64)
    bar = tqdm(range(len(cand)), desc=f"re-rank ({reranker.name})", unit="query", leave=False, disable=not progress)
    for q in bar:
        t0 = time.perf_counter()
        row = cand[q, :k]
        valid = row[row >= 0]
        if len(valid):
            s = np.asarray(
                reranker.score(query_features(q), [database_features(int(j)) for j in valid]), dtype=np.float64
            )
            order = rerank_order(s)
            ids[q, : len(valid)] = valid[order]
            scores[q, : len(valid)] = s[order]
        ms[q] = 1000 * (time.perf_counter() - t0)
    return RerankedCandidates(ids=ids, scores=scores, ms_per_query=ms, top_k=k)
