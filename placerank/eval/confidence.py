"""How sure each query's top-1 answer is, per stage, and which queries ``--rerank-below`` skips.

A confidence is a *ranking* score: a higher one means the answer is more likely right. It is
not a probability; what precision a threshold on it buys is read off the precision-recall curve
of a labelled run (:mod:`placerank.eval.precision`, ``results.json`` ``precision_recall``).

- **Global retrieval**: the *place margin* ``s_1 - s_out``: the top-1's cosine similarity minus
  the best similarity of a retrieved candidate that is *not the same place* as the top-1 (by the
  dataset's positives rule applied between database images: within ``radius`` metres, within
  the frame tolerance, or the same place id; for unlabelled data, any other image). Neighbours of
  the top-1 are skipped because a traversal's database has several frames of every place, whose
  near-equal similarities say nothing against the answer. When every retrieved candidate is the
  same place, ``s_out`` is the last candidate's similarity (a lower bound on the margin).
  On GardensPoint this orders queries better than the bare top-1 similarity (the VPR-Bench
  score); ``benchmarks/rerank_below.py`` records both PR-AUCs.
- **After re-ranking**: the re-ranker's own score of its top-1 (RANSAC inliers, mutual-NN
  count, FoL region score), the evidence the re-ranker sorted by.
- With ``--rerank-below CONF``, queries whose global confidence is ``>= CONF`` keep their
  global ranking; for the final PR curve they are ranked above every re-ranked query (they were
  the ones trusted without verification), each group by its own confidence
  (:func:`combined_confidence`).

``placerank localize`` reports a different number on purpose (``localize.estimate``): a
position estimate's agreement x margin in [0, 1], from candidates' metric positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placerank.errors import PlaceRankError

GLOBAL = "place margin: top-1 cosine similarity - best similarity of a retrieved candidate not at the top-1's place"


def rerank_description(name: str) -> str:
    return f"{name} score of the top-1 (the re-ranker's sort key)"


def same_place(database, rule, best: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(Q, K) bool: is database image ``others[q, k]`` the same place as ``best[q]`` by ``rule``
    (a :class:`~placerank.data.positives.PositiveRule`; ``database`` an ImageSet). -1 ids: False."""
    best = np.asarray(best, dtype=np.int64)
    others = np.asarray(others, dtype=np.int64)
    valid = (others >= 0) & (best[:, None] >= 0)
    b, o = np.maximum(best, 0)[:, None], np.maximum(others, 0)
    if rule.kind == "utm":
        pos = np.asarray(database.positions, dtype=np.float64)
        near = np.linalg.norm(pos[o] - pos[b], axis=-1) <= rule.radius
        if database.utm_zone is not None:
            near &= database.utm_zone[o] == database.utm_zone[b]
    elif rule.kind == "frame":
        frames = np.asarray(database.positions, dtype=np.int64)
        near = np.abs(frames[o] - frames[b]) <= rule.frame_tolerance
    elif rule.kind == "place":
        near = np.asarray(database.positions)[o] == np.asarray(database.positions)[b]
    else:  # unlabelled: only the image itself
        near = o == b
    return np.asarray(near, dtype=bool) & valid


def place_margin(similarities: np.ndarray, ids: np.ndarray, same: np.ndarray) -> np.ndarray:
    """(Q,) top-1 similarity minus the best similarity of a candidate not at the top-1's place
    (``same`` from :func:`same_place`); the last valid candidate's when all are. 0 without candidates."""
    sims = np.asarray(similarities, dtype=np.float64)
    valid = np.asarray(ids) >= 0
    if sims.size == 0:
        return np.zeros(len(sims))
    other = valid & ~np.asarray(same, dtype=bool)
    rival = np.where(other, sims, -np.inf).max(axis=1)
    last = sims[np.arange(len(sims)), np.maximum(valid.sum(axis=1) - 1, 0)]  # FAISS pads at the end
    rival = np.where(other.any(axis=1), rival, last)
    return np.where(valid.any(axis=1), sims[:, 0] - rival, 0.0)


def global_confidence(dataset, similarities: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(Q,) the first stage's confidence (:data:`GLOBAL`) of ranked ``ids`` with their ``similarities``."""
    ids = np.asarray(ids)
    if ids.shape[1] == 0:
        return np.zeros(len(ids))
    same = same_place(dataset.database, dataset.rule, ids[:, 0], ids)
    return place_margin(similarities, ids, same)


def rerank_confidence(scores: np.ndarray) -> np.ndarray:
    """(Q,) the re-ranker's score of its top-1 (``scores`` (Q, top_k) in re-ranked order)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        return np.zeros(len(scores))
    return np.nan_to_num(scores[:, 0], nan=0.0)


def check_rerank_below(value) -> float | None:
    """``--rerank-below`` as a float (None: re-rank every query); NaN / inf are one error line."""
    if value is None:
        return None
    try:
        conf = float(value)
    except (TypeError, ValueError):
        raise PlaceRankError(f"rerank_below must be a number (a first-stage confidence), got {value!r}") from None
    if not np.isfinite(conf):
        raise PlaceRankError(f"rerank_below must be a finite number (a first-stage confidence), got {value}")
    return conf


def queries_to_rerank(confidence: np.ndarray, rerank_below: float | None) -> np.ndarray:
    """(Q,) bool: the queries ``--rerank-below`` leaves to the re-ranker (global confidence < CONF)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if rerank_below is None:
        return np.ones(len(confidence), dtype=bool)
    return confidence < rerank_below


def combined_confidence(first: np.ndarray, reranked: np.ndarray, rerun: np.ndarray) -> np.ndarray:
    """One ranking score over all queries when only those in ``rerun`` were re-ranked: skipped
    queries above re-ranked ones, each group in the order of its own confidence, ties kept. The
    values are dense ranks (0 = least confident), so only their order means anything."""
    first = np.asarray(first, dtype=np.float64)
    reranked = np.asarray(reranked, dtype=np.float64)
    rerun = np.asarray(rerun, dtype=bool)
    out = np.zeros(len(first))
    low = np.unique(reranked[rerun], return_inverse=True)[1]
    out[rerun] = low
    high = np.unique(first[~rerun], return_inverse=True)[1]
    out[~rerun] = high + (low.max() + 1 if len(low) else 0)
    return out


@dataclass
class QueryConfidence:
    """Every query's confidence at both stages. ``final`` is the confidence of the final top-1
    (the re-ranker's score; the global one where not re-ranked); ``final_order`` ranks all
    queries by it (``final`` itself, or :func:`combined_confidence` when some were skipped)."""

    first: np.ndarray
    final: np.ndarray
    final_order: np.ndarray
    reranked: np.ndarray  # (Q,) bool: the re-ranker scored this query
    first_description: str
    final_description: str


def query_confidence(
    first: np.ndarray, scores: np.ndarray | None, rerun: np.ndarray, reranker: str | None
) -> QueryConfidence:
    """Both stages' confidences; ``scores`` the re-ranked scores (Q, top_k) (None: no re-ranking)
    and ``rerun`` which queries the re-ranker saw."""
    first = np.asarray(first, dtype=np.float64)
    if scores is None or reranker is None:
        none = np.zeros(len(first), dtype=bool)
        return QueryConfidence(first, first, first, none, GLOBAL, GLOBAL)
    rerun = np.asarray(rerun, dtype=bool)
    final = np.where(rerun, rerank_confidence(scores), first)
    if rerun.all():
        return QueryConfidence(first, final, final, rerun, GLOBAL, rerank_description(reranker))
    description = (
        f"{rerank_description(reranker)} for re-ranked queries; queries skipped by --rerank-below"
        " (global place margin >= CONF) ranked above them by their place margin"
    )
    return QueryConfidence(first, final, combined_confidence(first, final, rerun), rerun, GLOBAL, description)


def rerank_below_info(rerank_below: float | None, rerun: np.ndarray, totals: dict) -> dict:
    """The ``results.json`` ``rerank`` entry's ``rerank_below`` record (empty without the option):
    the threshold, how many queries were re-ranked / skipped, and the seconds the re-ranking took
    (local features of the re-ranked queries and their candidates, then the scoring loop)."""
    if rerank_below is None:
        return {}
    rerun = np.asarray(rerun, dtype=bool)
    return {
        "rerank_below": {
            "conf": rerank_below,
            "queries_reranked": int(rerun.sum()),
            "queries_skipped": int((~rerun).sum()),
            "extract_local_s": round(float(totals.get("extract_local", 0.0)), 3),
            "rerank_s": round(float(totals.get("rerank", 0.0)), 3),
        }
    }
