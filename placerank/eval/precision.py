"""Precision-recall over queries ranked by confidence: the VPR_Tutorial / VPR-Bench metrics.

Recall@N says how often the right place is *among* the answers; it cannot say whether a robot
may *trust* an answer. For that every query's top-1 carries a confidence
(:mod:`placerank.eval.confidence`), and a threshold on it accepts some answers and rejects the
rest. Sweeping the threshold gives the precision-recall curve of single-best-match place
recognition, exactly as ``createPR(..., matching="single")`` in Schubert et al.'s VPR_Tutorial
(``evaluation/metrics.py``) defines it:

- a query's top-1 is a *true positive* when it is one of the query's positives, else a
  *false positive* (a query without any positive can only be wrong when accepted);
- at threshold ``t`` the accepted queries are those with confidence ``>= t`` (tied confidences
  are accepted or rejected together); precision = TP / accepted; recall = TP / GTP, where
  GTP = the number of queries that *have* a positive. So queries without positives lower the
  precision when accepted but never count in the recall's denominator, and the curve ends at
  recall = R@1 (the project's Recall@1, which excludes them the same way);
- the curve starts at (recall 0, precision 1), as VPR_Tutorial's does;
- **PR-AUC** = the trapezoidal area under (recall, precision), ``np.trapz(P, R)`` in
  VPR_Tutorial's demo (here :func:`sklearn.metrics.auc`);
- **Recall@100%Precision** = the largest recall at precision 1: the fraction of queries with
  positives answered before the first wrong answer when queries are taken in order of
  decreasing confidence (``recallAt100precision``).

One difference, on purpose: VPR_Tutorial samples 100 evenly spaced thresholds between the
largest and smallest score, which can step over the last threshold before the first wrong answer;
here every distinct confidence is a threshold (:func:`sklearn.metrics.precision_recall_curve`),
the exact curve VPR_Tutorial's approaches as its ``n_thresh`` grows. scikit-learn's recall
divides by the number of *correct* top-1s (VPR-Bench uses it that way, so its curves always end
at recall 1); it is rescaled here by (correct top-1s / GTP) to VPR_Tutorial's recall.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFINITION = (
    "VPR_Tutorial single-best-match: top-1 correct = a positive; accepted = confidence >= threshold"
    " over every distinct confidence; recall = TP / queries with positives; PR-AUC trapezoidal from (0, 1)"
)


@dataclass
class PRCurve:
    """``recall`` / ``precision`` from the (0, 1) start to the all-accepted end, ``thresholds[i]``
    the confidence threshold of point ``i + 1``."""

    recall: np.ndarray
    precision: np.ndarray
    thresholds: np.ndarray
    auc: float
    recall_at_100_precision: float
    # the lowest confidence still accepted at 100% precision; None when the most confident is wrong
    threshold_at_100_precision: float | None
    num_queries: int
    num_with_positives: int

    def summary(self, confidence: str) -> dict:
        """The ``results.json`` entry: rounded numbers and what the confidence is."""
        t = self.threshold_at_100_precision
        return {
            "auc": _round(self.auc),
            "recall_at_100_precision": _round(self.recall_at_100_precision),
            # not rounded: passed back as --rerank-below CONF it must select exactly the same queries
            "threshold_at_100_precision": t,
            "confidence": confidence,
            "definition": DEFINITION,
        }


def _round(v: float, digits: int = 4) -> float | None:
    return None if not np.isfinite(v) else round(float(v), digits)


def precision_recall(confidence, correct, has_positive) -> PRCurve:
    """The precision-recall curve of per-query top-1 answers ranked by ``confidence`` (Q,):
    ``correct`` (Q,) bool = the top-1 is a positive, ``has_positive`` (Q,) bool = the query has
    any positive. Without any query with positives the metrics are NaN (nothing to recall)."""
    from sklearn.metrics import auc, precision_recall_curve

    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    has = np.asarray(has_positive, dtype=bool).reshape(-1)
    if not (len(conf) == len(ok) == len(has)):
        raise ValueError(f"{len(conf)} confidences, {len(ok)} correct flags, {len(has)} has-positive flags")
    if not np.isfinite(conf).all():
        raise ValueError("confidences must be finite numbers")
    if (ok & ~has).any():
        raise ValueError("a query without positives cannot have a correct top-1")
    gtp, tp_all = int(has.sum()), int(ok.sum())
    if len(conf) == 0 or gtp == 0:
        nan = float("nan")
        return PRCurve(np.zeros(1), np.ones(1), np.zeros(0), nan, nan, None, len(conf), gtp)
    distinct = np.unique(conf)[::-1]  # thresholds, most confident first
    if tp_all == 0:  # every answer is wrong: precision 0 at every threshold, recall 0
        recall = np.zeros(len(distinct) + 1)
        precision = np.concatenate([[1.0], np.zeros(len(distinct))])
        return PRCurve(recall, precision, distinct, 0.0, 0.0, None, len(conf), gtp)
    p, r, t = precision_recall_curve(ok.astype(np.int64), conf)
    # scikit-learn: decreasing recall, a last (recall 0, precision 1) point without threshold
    precision, recall, thresholds = p[::-1].copy(), r[::-1] * (tp_all / gtp), t[::-1].copy()
    if thresholds[-1] > distinct[-1]:  # older scikit-learn stops at full recall: add the all-accepted point
        precision = np.append(precision, tp_all / len(conf))
        recall = np.append(recall, tp_all / gtp)
        thresholds = np.append(thresholds, distinct[-1])
    perfect = np.flatnonzero(precision[1:] == 1.0)
    r100 = float(recall[1 + perfect[-1]]) if len(perfect) else 0.0
    t100 = float(thresholds[perfect[-1]]) if len(perfect) else None
    return PRCurve(recall, precision, thresholds, float(auc(recall, precision)), r100, t100, len(conf), gtp)


def top1_correct(ids: np.ndarray, positives) -> np.ndarray:
    """(Q,) bool: is each query's rank-1 database image one of its positives."""
    ids = np.asarray(ids)
    return np.array([len(p) > 0 and ids[q, 0] >= 0 and bool(np.isin(ids[q, 0], p)) for q, p in enumerate(positives)])


def stage_precision_recall(
    first_confidence, first_ids: np.ndarray, final_confidence, final_ids: np.ndarray, positives
) -> tuple[PRCurve, PRCurve]:
    """The PR curves of the first stage's and the final top-1s, each ranked by its own confidence."""
    has = np.array([len(p) > 0 for p in positives], dtype=bool)
    first = precision_recall(first_confidence, top1_correct(first_ids, positives), has)
    final = precision_recall(final_confidence, top1_correct(final_ids, positives), has)
    return first, final


def precision_recall_entries(
    confidence, first_ids: np.ndarray, final_ids: np.ndarray, positives, rerank_label: str | None = None
) -> tuple[dict, dict, dict[str, PRCurve]]:
    """``results.json``'s ``precision_recall`` (final top-1s) and ``precision_recall_first_stage``
    entries, and the curves to draw by label; ``confidence`` a
    :class:`~placerank.eval.confidence.QueryConfidence`. Without re-ranking both entries are the same."""
    first, final = stage_precision_recall(confidence.first, first_ids, confidence.final_order, final_ids, positives)
    curves = {"global retrieval": first}
    if rerank_label is not None:
        curves[rerank_label] = final
    return final.summary(confidence.final_description), first.summary(confidence.first_description), curves


def summary_lines(result) -> list[str]:
    """What ``placerank eval`` prints about confidence (an :class:`~placerank.eval.results.EvalResult`)."""

    def one(label: str, pr: dict) -> str:
        t = pr.get("threshold_at_100_precision")
        auc, r100 = pr.get("auc"), pr.get("recall_at_100_precision")
        if auc is None or r100 is None:
            return f"{label:18s}PR-AUC n/a"
        at = f" (confidence >= {t:.4g})" if t is not None else ""
        return f"{label:18s}PR-AUC {auc:.3f}  R@100%P {100 * r100:5.1f}{at}"

    if not result.precision_recall_first_stage:
        return []
    lines = [one("global", result.precision_recall_first_stage)]
    if result.rerank:
        lines.append(one("+ " + result.rerank["name"], result.precision_recall))
        below = result.rerank.get("rerank_below")
        if below:
            lines.append(
                f"--rerank-below {below['conf']:g}: re-ranked {below['queries_reranked']} queries, skipped"
                f" {below['queries_skipped']}; re-ranking took {below['extract_local_s'] + below['rerank_s']:.1f}s"
            )
    return lines
