"""The files eval writes beside ``results.json``: ``predictions.csv`` and ``examples/*.png``.

For unlabelled data ``predictions.csv`` lists each query's top-5 and the example
pictures carry no right/wrong marks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from placerank.descriptors.cache import image_key
from placerank.eval.recall import hits_matrix
from placerank.utils import atomic_path
from placerank.viz.examples import draw_example, pick_example_queries


def write_predictions(path: Path, ds, ids: np.ndarray, positives, confidence=None) -> None:
    """One row per query: its top-5 database images (and, when labelled, whether they are right);
    with ``confidence`` (a :class:`~placerank.eval.confidence.QueryConfidence`) the top-1's
    ``confidence`` (the final stage's: re-ranker score or global place margin), the global
    ``first_stage_confidence`` and whether the query was ``reranked``."""
    conf_head = ["confidence", "first_stage_confidence", "reranked"] if confidence is not None else []

    def conf_cells(q: int) -> list:
        if confidence is None:
            return []
        # shortest exact repr: a value copied into --rerank-below selects exactly the queries it should
        return [repr(float(confidence.final[q])), repr(float(confidence.first[q])), int(confidence.reranked[q])]

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        if not ds.labelled:
            w.writerow(["query", *conf_head, "top5"])
            for q in range(len(ids)):
                top5 = " ".join(str(ds.database.paths[j]) for j in ids[q, :5] if j >= 0)
                w.writerow([ds.queries.paths[q], *conf_cells(q), top5])
            return
        w.writerow(["query", "correct_at_1", "first_positive_rank", *conf_head, "top5"])
        hits = hits_matrix(ids[:, :5], positives)
        full = hits_matrix(ids, positives)
        for q in range(len(ids)):
            rank = int(np.argmax(full[q])) + 1 if full[q].any() else -1
            top5 = " ".join(str(ds.database.paths[j]) for j in ids[q, :5])
            w.writerow([ds.queries.paths[q], int(hits[q, 0]), rank, *conf_cells(q), top5])


def write_examples(folder: Path, ds, before: np.ndarray, after: np.ndarray, positives, n: int, reranker, store) -> None:
    if n <= 0:
        return
    hb = hits_matrix(before[:, :1], positives)[:, 0]
    ha = hits_matrix(after[:, :1], positives)[:, 0]
    folder.mkdir(parents=True, exist_ok=True)
    if ds.labelled:
        chosen = pick_example_queries(hb, ha, n)
    else:  # no right or wrong: queries spread evenly over the set
        chosen = sorted({int(i) for i in np.linspace(0, len(after) - 1, min(n, len(after))).round()})
    top = min(5, after.shape[1])
    for q in chosen:
        cands = after[q, :top]
        correct = np.isin(cands, positives[q]).tolist() if ds.labelled else None
        name = Path(ds.queries.paths[q]).stem
        draw_example(
            ds.queries.paths[q],
            [ds.database.paths[j] for j in cands],
            correct,
            folder / f"query_{q:05d}_{name}.png",
            labels=[Path(ds.database.paths[j]).name for j in cands],
            title=f"query {q}: {Path(ds.queries.paths[q]).name} — top-{top}"
            f"{' after re-ranking' if reranker is not None else ''}",
        )
    if reranker is not None and hasattr(reranker, "matches"):
        try:
            from placerank.viz.matches import draw_matches
        except ImportError:
            return
        for q in chosen[:3]:
            j = int(after[q, 0])
            qlf = store.get(image_key(ds.queries.paths[q]))
            clf = store.get(image_key(ds.database.paths[j]))
            pairs = reranker.matches(qlf, clf)
            draw_matches(
                ds.queries.paths[q],
                ds.database.paths[j],
                qlf.keypoints,
                clf.keypoints,
                pairs,
                folder / f"matches_{q:05d}.png",
                title=f"{reranker.name}: {len(pairs)} matches, query {q} vs top-1 {Path(ds.database.paths[j]).name}",
            )
