"""Sequence matching (SeqSLAM-style) on each frame's top-K candidates, never an N x N matrix.

A robot or a car sees its places in order. A single frame of a winter traversal may look like
many summer places, but the *last L frames* of the query, laid along a straight path through the
ordered database, pick out the one stretch of track where all of them agree (Milford & Wyeth,
SeqSLAM, ICRA 2012). For query frame ``t`` and a database end position ``e`` (both in traversal
order, :class:`~placerank.data.sequences.FrameOrder`), with velocity ``v`` database frames per
query frame::

    score(t, e) = max_v  1/n * sum_{l=0}^{n-1}  s(t - l, e - round(v * l))

where ``s(f, x)`` is the per-frame score of query frame ``f`` for database position ``x`` and
``n = min(L, frames of the query's sequence up to t)``: a query with fewer than ``L`` earlier
frames uses what it has. Paths never cross a sequence boundary on either side: earlier query
frames come from the query's own sequence, and a path term that would leave the end position's
database sequence (or the database) counts as the frame's *fill* value (below).

**Sparse similarities.** ``s(f, x)`` is known only for frame ``f``'s top-K candidates (FAISS
search); every other database position gets the frame's fill, the lowest score it kept (an upper
bound on the missing ones, so missing evidence is neither rewarded nor punished against the
frame's own tail). The sum is then computed by *voting*: every kept candidate ``x`` of frame
``t - l`` votes ``s - fill`` for the end ``x + round(v * l)`` of each velocity, and an end's score
is the frames' fills plus its votes. Ends without a vote have the all-fill score, the lowest
possible, and are not listed; the ranking of the listed ends is exact for the sparse matrix, and
with ``K = N`` it is exact SeqSLAM (without its local contrast normalisation;
``normalize="zscore"`` is a per-frame stand-in). Cost per query: O(L * V * K) votes, sorted once
(O(L V K log(L V K))), with V the distinct velocity paths (3 for L=5, 5 for L>=10 at 0.8..1.2);
memory O(Q * K) for the candidate lists plus one chunk's votes (:data:`MAX_VOTES`); nothing
depends on the database size N except the search that produced the top-K.

**Re-rankers.** :func:`frame_scores` puts a re-ranker's scores on the frame's similarity scale
before aggregation (see there), so sequence matching works after any model and any re-ranker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from placerank.data.sequences import FrameOrder
from placerank.errors import PlaceRankError

NORMALIZE = ("none", "zscore")


@dataclass(frozen=True)
class SequenceOptions:
    """``length``: frames aggregated (L; 1 = off). Velocities ``v_min..v_max`` in steps of
    ``v_step``, in database frames per query frame (SeqSLAM's 0.8..1.2 by default: both
    traversals at about the same speed, either up to 20 % faster). ``candidates``: K kept per
    frame. ``normalize``: ``none`` (raw scores) or ``zscore`` (each frame's kept scores minus
    their mean, over their standard deviation: a frame whose candidates all look alike, a tunnel
    or a blank wall, then weighs no more than a distinctive one)."""

    length: int = 1
    v_min: float = 0.8
    v_max: float = 1.2
    v_step: float = 0.1
    candidates: int = 100
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.length < 1:
            raise PlaceRankError(f"sequence length must be >= 1 (1 = off), got {self.length}")
        if not (0 < self.v_min <= self.v_max) or self.v_step <= 0:
            raise PlaceRankError(
                f"sequence velocities need 0 < v_min <= v_max and v_step > 0, got {self.v_min}..{self.v_max}"
                f" step {self.v_step}"
            )
        if self.candidates < 1:
            raise PlaceRankError(f"sequence candidates must be >= 1, got {self.candidates}")
        if self.normalize not in NORMALIZE:
            raise PlaceRankError(f"sequence normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize}")

    def velocities(self) -> np.ndarray:
        count = int(np.floor((self.v_max - self.v_min) / self.v_step + 1e-9)) + 1
        return self.v_min + self.v_step * np.arange(count)

    def offsets(self) -> np.ndarray:
        """(V, L) int64: how many database frames back path term ``l`` lies at velocity ``v``
        (duplicate rows, from velocities that round alike, removed)."""
        off = np.rint(self.velocities()[:, None] * np.arange(self.length)[None, :]).astype(np.int64)
        return np.unique(off, axis=0)

    def describe(self) -> dict:
        return {
            "length": self.length,
            "velocities": [round(float(v), 4) for v in self.velocities()],
            "candidates_per_frame": self.candidates,
            "normalize": self.normalize,
        }


def frame_scores(similarities: np.ndarray, rerank_scores: np.ndarray | None = None) -> np.ndarray:
    """(Q, K) float64 per-frame scores entering the sequence sum.

    Without a re-ranker: the global similarities. With one (``rerank_scores`` (Q, k <= K) for
    the first k candidates, in the re-ranked order, as ``Candidates.scores``): each frame's
    re-ranker scores are mapped linearly onto the range of the global similarities of those same
    k candidates (best re-ranker score -> their highest similarity, worst -> their lowest), so a
    re-ranker's inlier counts or MNN counts keep its order within the frame while every frame
    stays on the one similarity scale; candidates past k keep their global similarity (never above
    the re-ranked ones' lowest). A frame whose re-ranker scores are all equal keeps its
    similarities."""
    sims = np.asarray(similarities, dtype=np.float64)
    out = sims.copy()
    if rerank_scores is None or rerank_scores.shape[1] == 0:
        return out
    k = rerank_scores.shape[1]
    head = sims[:, :k]
    r = np.asarray(rerank_scores, dtype=np.float64)
    lo_s, hi_s = head.min(axis=1, keepdims=True), head.max(axis=1, keepdims=True)
    lo_r, hi_r = r.min(axis=1, keepdims=True), r.max(axis=1, keepdims=True)
    span = hi_r - lo_r
    mapped = lo_s + (r - lo_r) / np.where(span > 0, span, 1.0) * (hi_s - lo_s)
    out[:, :k] = np.where(span > 0, mapped, head)
    return out


@dataclass
class SequenceMatches:
    """``ids`` (Q, depth) database indices best first (-1 padding), ``scores`` (Q, depth) their
    sequence scores (mean per-frame score along the best path), ``frames`` (Q,) query frames
    each query used, ``velocity`` (Q,) the best path's velocity for the top match."""

    ids: np.ndarray
    scores: np.ndarray
    frames: np.ndarray
    velocity: np.ndarray


def _normalized(scores: np.ndarray, valid: np.ndarray, how: str) -> np.ndarray:
    if how == "none":
        return scores
    s = np.where(valid, scores, np.nan)
    mean = np.nanmean(s, axis=1, keepdims=True)
    std = np.nanstd(s, axis=1, keepdims=True)
    return np.where(valid, (scores - mean) / np.where(std > 0, std, 1.0), 0.0)


def sequence_match(
    ids: np.ndarray,
    scores: np.ndarray,
    query_order: FrameOrder,
    database_order: FrameOrder,
    options: SequenceOptions,
    depth: int,
    chunk: int = 1024,
    progress: bool = True,
    queries: np.ndarray | None = None,
) -> SequenceMatches:
    """Sequence scores of every query from the per-frame top-K ``ids`` (Q, K) database indices
    (-1 = none) and their ``scores`` (Q, K) (:func:`frame_scores`); returns the best ``depth``
    database images per query. Queries are processed ``chunk`` at a time (the result does not
    depend on ``chunk``); only (Q, K) arrays and a chunk's votes are ever held.
    ``queries``: score only these rows (the others' frames still serve as history; a live
    traversal scores its newest frame); the result then has one row per listed query."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or np.shape(scores) != ids.shape:
        raise ValueError(f"ids {ids.shape} and scores {np.shape(scores)} must be the same (Q, K)")
    if len(query_order) != len(ids):
        raise PlaceRankError(f"the query order has {len(query_order)} images but there are {len(ids)} queries")
    n_db = len(database_order)
    if ids.size and ids.max() >= n_db:
        raise PlaceRankError(f"candidate id {int(ids.max())} is outside the database's {n_db} images")
    valid = ids >= 0
    s = _normalized(np.asarray(scores, dtype=np.float64), valid, options.normalize)
    fill = np.where(valid, s, np.inf).min(axis=1)
    fill[~np.isfinite(fill)] = 0.0
    pos = np.where(valid, database_order.rank[np.where(valid, ids, 0)], -1)  # traversal positions
    history = query_order.history(options.length)
    offsets = options.offsets()
    # the velocity a row of offsets stands for (rows that round alike were merged), for reporting
    vel_of_row = offsets[:, -1] / (options.length - 1) if options.length > 1 else np.ones(len(offsets))
    rows = np.arange(len(ids)) if queries is None else np.asarray(queries, dtype=np.int64).reshape(-1)
    depth = max(1, min(int(depth), n_db))
    out = SequenceMatches(
        ids=np.full((len(rows), depth), -1, dtype=np.int64),
        scores=np.full((len(rows), depth), -np.inf, dtype=np.float64),
        frames=(history[rows] >= 0).sum(axis=1),
        velocity=np.zeros(len(rows), dtype=np.float64),
    )
    # a chunk's votes are (chunk, V, L, K) arrays: keep them to about MAX_VOTES entries
    step = max(1, min(int(chunk), MAX_VOTES // max(1, offsets.size * ids.shape[1])))
    bar = tqdm(total=len(rows), desc=f"sequence (L={options.length})", unit="query", leave=False, disable=not progress)
    for start in range(0, len(rows), step):
        part = slice(start, min(start + step, len(rows)))
        c, end, score, v = _score_chunk(history[rows[part]], offsets, pos, s, fill, database_order.sequence, n_db)
        first = np.r_[True, c[1:] != c[:-1]] if len(c) else np.zeros(0, dtype=bool)
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(c)), 0))
        rank = np.arange(len(c)) - group_start
        keep = rank < depth
        out.ids[start + c[keep], rank[keep]] = database_order.order[end[keep]]
        out.scores[start + c[keep], rank[keep]] = score[keep]
        out.velocity[start + c[first]] = vel_of_row[v[first]]
        bar.update(part.stop - part.start)
    bar.close()
    return out


MAX_VOTES = 250_000


def _score_chunk(
    history: np.ndarray,
    offsets: np.ndarray,
    pos: np.ndarray,
    s: np.ndarray,
    fill: np.ndarray,
    db_seq: np.ndarray,
    n_db: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sequence scores of a chunk of queries by voting: every term of a path is the frame's fill
    unless the frame kept the database position it lands on, so

        score(v, e) * n = sum_l fill(t-l) + sum over kept hits (s - fill(t-l)),

    and each kept candidate x of frame t-l votes ``s - fill`` for end ``x + offset(v, l)`` (when
    that end is in the database and in x's sequence). Returns (query in chunk, end position,
    score, best velocity row) for every end that got a vote, sorted by query, then score
    descending, then end ascending."""
    n_rows, n_vel = len(history), len(offsets)
    present = history >= 0
    f = np.maximum(history, 0)
    frames = present.sum(axis=1)
    base = np.where(present, fill[f], 0.0).sum(axis=1)
    x = pos[f]  # (C, L, K)
    gain = s[f] - fill[f][..., None]
    ok = present[..., None] & (x >= 0)
    ends = x[:, None] + offsets[None, :, :, None]  # (C, V, L, K)
    ok = ok[:, None] & (ends < n_db)
    ok &= db_seq[np.minimum(ends, n_db - 1)] == db_seq[np.maximum(x, 0)][:, None]
    chunk_row = np.arange(n_rows)[:, None, None, None]
    vel_row = np.arange(n_vel)[None, :, None, None]
    key = ((chunk_row * n_vel + vel_row) * n_db + ends)[ok]
    votes = np.broadcast_to(gain[:, None], ok.shape)[ok]
    keys, inverse = np.unique(key, return_inverse=True)
    extra = np.bincount(inverse.ravel(), weights=votes, minlength=len(keys))
    c, v, end = keys // (n_vel * n_db), (keys // n_db) % n_vel, keys % n_db
    # per (query, end): the best velocity
    order = np.lexsort((-extra, c * n_db + end))
    pair = (c * n_db + end)[order]
    best = order[np.r_[True, pair[1:] != pair[:-1]]] if len(order) else order
    c, end, v = c[best], end[best], v[best]
    score = (base[c] + extra[best]) / np.maximum(frames[c], 1)
    ranked = np.lexsort((end, -score, c))
    return c[ranked], end[ranked], score[ranked], v[ranked]
