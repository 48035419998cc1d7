"""Ground truth computed from positions, in chunks (never an N_query x N_db matrix).

The rule (:class:`PositiveRule`) lives here with the computation; :mod:`placerank.data.dataset`
builds on both (this module never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from scipy.spatial import cKDTree

PositionKind = Literal["utm", "frame", "place", "none"]


class Positioned(Protocol):
    """What the rules read from an image set (:class:`placerank.data.dataset.ImageSet`)."""

    positions: np.ndarray
    utm_zone: np.ndarray | None


@dataclass(frozen=True)
class PositiveRule:
    """How to decide that a database image shows the query's place.

    - ``utm``: Euclidean distance <= ``radius`` metres (same UTM zone when zones are known);
    - ``frame``: ``|i - j| <= frame_tolerance``;
    - ``place``: equal place identifiers;
    - ``none``: unlabelled images (no positions): no positives, so no recall.
    """

    kind: PositionKind
    radius: float = 25.0
    frame_tolerance: int = 0

    def describe(self) -> str:
        if self.kind == "utm":
            return f"distance <= {self.radius:g} m"
        if self.kind == "frame":
            return f"|i-j| <= {self.frame_tolerance}"
        if self.kind == "none":
            return "unlabelled"
        return "same place_id"


def compute_positives(
    database: Positioned, queries: Positioned, rule: PositiveRule, chunk: int = 4096
) -> list[np.ndarray]:
    """Return, for each query, the sorted int64 array of positive database indices."""
    if rule.kind == "utm":
        return _radius_positives(database, queries, rule.radius, chunk)
    if rule.kind == "frame":
        return _frame_positives(database.positions, queries.positions, rule.frame_tolerance)
    if rule.kind == "none":
        return [np.zeros(0, dtype=np.int64) for _ in range(len(queries.positions))]
    return _place_positives(database.positions, queries.positions)


def _radius_positives(database: Positioned, queries: Positioned, radius: float, chunk: int) -> list[np.ndarray]:
    # A KD-tree in float64 metres: UTM northings are ~5e6, where float32 would lose ~0.5 m.
    tree = cKDTree(np.asarray(database.positions, dtype=np.float64))
    out: list[np.ndarray] = []
    qpos = np.asarray(queries.positions, dtype=np.float64)
    for start in range(0, len(qpos), chunk):
        hits = tree.query_ball_point(qpos[start : start + chunk], r=radius)
        out.extend(np.array(sorted(h), dtype=np.int64) for h in hits)
    if database.utm_zone is not None and queries.utm_zone is not None:
        dz, qz = database.utm_zone, queries.utm_zone
        out = [p[dz[p] == qz[i]] for i, p in enumerate(out)]
    return out


def _frame_positives(db_frames: np.ndarray, q_frames: np.ndarray, tol: int) -> list[np.ndarray]:
    order = np.argsort(db_frames, kind="stable")
    sorted_frames = np.asarray(db_frames)[order]
    lo = np.searchsorted(sorted_frames, np.asarray(q_frames) - tol, side="left")
    hi = np.searchsorted(sorted_frames, np.asarray(q_frames) + tol, side="right")
    return [np.sort(order[a:b]).astype(np.int64) for a, b in zip(lo, hi)]


def _place_positives(db_places: np.ndarray, q_places: np.ndarray) -> list[np.ndarray]:
    groups: dict[object, list[int]] = {}
    for j, p in enumerate(db_places.tolist()):
        groups.setdefault(p, []).append(j)
    empty = np.zeros(0, dtype=np.int64)
    return [np.asarray(groups.get(p, empty), dtype=np.int64) for p in q_places.tolist()]
