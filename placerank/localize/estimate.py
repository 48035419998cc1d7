"""Position estimate and confidence from the top retrieved (or re-ranked) database photos.

Why not just take the top-1 position? Because neighbouring database photos of the same place
usually all come back near the top, and their score-weighted mean is a better estimate than any
single one; and because *how much* of the evidence agrees is what a confidence should say.

Given the top-K candidates with positions ``p_k`` (metres, one common frame) and scores ``s_k``:

1. **Weights.** ``w_k = exp((s_k - s_max) / tau)``. For retrieval, ``s`` is the cosine similarity
   and ``tau = 0.02`` (a candidate 0.05 below the best weighs 0.08 of it). With a re-ranker, ``s``
   is the re-rank score divided by the best one (inlier counts, say) and ``tau = 0.1``: a
   candidate with half the best's inliers weighs e^-5 = 0.007 of it.
2. **Place.** The best candidate ``b`` (rank 1 after re-ranking) fixes the place; the *agreeing*
   set ``A`` is every candidate within ``radius`` metres of ``p_b``.
3. **Estimate** = the weighted mean of ``p_k`` over ``A``.
4. **Confidence** = ``share x margin_factor``, both in [0, 1]:
   ``share`` = sum of ``w`` over ``A`` / sum of ``w`` over all K (how much of the evidence points
   at this place); ``margin_factor`` = ``min(1, (s_b - s_out) / m0)`` where ``s_out`` is the best
   score *outside* ``A`` (1 when every candidate agrees), ``m0 = 0.05`` for cosine similarity and
   0.5 for normalised re-rank scores. A photo whose runner-up place scores almost the same as
   the winner gets a low confidence even when the winner has many neighbours.

Known limit: with a database that covers a single place (everything within ``radius``), there is
no competing place, so the confidence is high for any photo; look at the similarity too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EstimateConfig:
    radius: float = 25.0  # metres: candidates this close to the best one agree with it
    tau_similarity: float = 0.02
    tau_rerank: float = 0.1
    margin_similarity: float = 0.05  # m0 for cosine similarities
    margin_rerank: float = 0.5  # m0 for re-rank scores normalised by the best


@dataclass
class Estimate:
    position: np.ndarray | None  # (2,) metres in the candidates' frame; None: no candidate has a position
    best: int  # index (into the candidate list) of the place-defining candidate; -1 if none
    agrees: np.ndarray  # (K,) bool
    weights: np.ndarray  # (K,) float, 0 for candidates without a position
    share: float
    margin: float | None  # s_best - best score outside the agreeing set; None if all agree
    margin_factor: float
    confidence: float


def estimate_position(
    positions: np.ndarray, scores: np.ndarray, mode: str = "similarity", config: EstimateConfig = EstimateConfig()
) -> Estimate:
    """``positions`` (K,2) metres (NaN rows = no position), ``scores`` (K,) in ranked order
    (index 0 = rank 1); ``mode``: 'similarity' (cosine) or 'rerank' (non-negative scores)."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = len(scores)
    if len(positions) != k:
        raise ValueError(f"{len(positions)} positions for {k} scores")
    has = np.asarray(np.isfinite(positions).all(axis=1), dtype=bool)
    empty = Estimate(None, -1, np.zeros(k, bool), np.zeros(k), 0.0, 0.0, 0.0, 0.0)
    if not has.any():
        return empty
    if mode == "similarity":
        s, tau, m0 = scores, config.tau_similarity, config.margin_similarity
    elif mode == "rerank":
        top = max(float(np.max(scores[has])), 0.0)
        if top <= 0:
            return empty  # no geometric evidence for any candidate
        s, tau, m0 = np.maximum(scores, 0.0) / top, config.tau_rerank, config.margin_rerank
    else:
        raise ValueError(f"unknown mode '{mode}'")
    s_max = float(np.max(s[has]))
    w = np.where(has, np.exp((s - s_max) / tau), 0.0)
    best = int(np.flatnonzero(has)[0])  # candidates are already in ranked order
    dist = np.linalg.norm(np.where(has[:, None], positions - positions[best], np.inf), axis=1)
    agrees = has & (dist <= config.radius)
    position = (w[agrees, None] * positions[agrees]).sum(axis=0) / w[agrees].sum()
    share = float(w[agrees].sum() / w.sum())
    outside = has & ~agrees
    if outside.any():
        margin = float(s[best] - np.max(s[outside]))
        margin_factor = float(np.clip(margin / m0, 0.0, 1.0))
    else:
        margin, margin_factor = None, 1.0
    return Estimate(position, best, agrees, w, share, margin, margin_factor, share * margin_factor)
