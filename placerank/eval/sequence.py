"""``eval --sequence-length L``: sequence matching after retrieval (and re-ranking).

The traversal order of both sides is read before any work (:func:`sequence_orders`; unordered
data is a one-line error), the search keeps :attr:`SequenceOptions.candidates` per frame, and
:func:`apply_sequence` turns each frame's final scores (global similarities, or a re-ranker's
scores on that scale, :func:`~placerank.rerank.sequence.frame_scores`) into sequence scores
(:func:`~placerank.rerank.sequence.sequence_match`). See ``docs/sequence.md``.
"""

from __future__ import annotations

import time

import numpy as np

from placerank.data.dataset import Dataset
from placerank.data.sequences import FrameOrder, frame_order
from placerank.errors import PlaceRankError
from placerank.index.candidates import Candidates
from placerank.rerank.sequence import SequenceOptions, frame_scores, sequence_match


def sequence_options(
    length: int, candidates: int = 100, velocity: tuple[float, float] = (0.8, 1.2)
) -> SequenceOptions | None:
    """None for ``length == 1`` (off); a one-line error for ``length < 1``. ``velocity``: the
    (min, max) database frames per query frame, searched in steps of 0.1."""
    if length < 1:
        raise PlaceRankError(f"--sequence-length must be >= 1 (1 = off), got {length}")
    if length == 1:
        return None
    lo, hi = (float(v) for v in velocity)
    return SequenceOptions(length=int(length), candidates=int(candidates), v_min=lo, v_max=hi)


def sequence_orders(ds: Dataset) -> tuple[FrameOrder, FrameOrder]:
    """(query order, database order), or a one-line error naming the side that has none."""
    try:
        return frame_order(ds.queries, "queries"), frame_order(ds.database, "database")
    except PlaceRankError as e:
        raise PlaceRankError(f"--sequence-length needs ordered traversals: {e}") from None


def apply_sequence(
    candidates: Candidates,
    orders: tuple[FrameOrder, FrameOrder],
    options: SequenceOptions,
    depth: int,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """(Q, depth) database ids ranked by sequence score, and the ``results.json`` record."""
    t0 = time.perf_counter()
    k = min(options.candidates, candidates.ids.shape[1])
    scores = frame_scores(candidates.similarities, candidates.scores)
    matches = sequence_match(
        candidates.ids[:, :k], scores[:, :k], orders[0], orders[1], options, depth, progress=progress
    )
    elapsed = time.perf_counter() - t0
    info = {
        **options.describe(),
        "candidates_per_frame": int(k),
        "scores": "re-ranker scores mapped onto the global similarity range"
        if candidates.scores is not None
        else "global similarity",
        "queries": orders[0].describe(),
        "database": orders[1].describe(),
        "query_frames_used": {
            "mean": round(float(matches.frames.mean()), 3) if len(matches.frames) else 0.0,
            "fewer_than_length": int((matches.frames < options.length).sum()),
        },
        "ms_per_query": round(1000 * elapsed / max(1, len(matches.ids)), 4),
    }
    return matches.ids, info
