"""Ground truth computed from positions, in chunks (never an N_query x N_db matrix)."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from placerank.data.dataset import ImageSet, PositiveRule


def compute_positives(database: ImageSet, queries: ImageSet, rule: PositiveRule, chunk: int = 4096) -> list[np.ndarray]:
    """Return, for each query, the sorted int64 array of positive database indices."""
    if rule.kind == "utm":
        return _radius_positives(database, queries, rule.radius, chunk)
    if rule.kind == "frame":
        return _frame_positives(database.positions, queries.positions, rule.frame_tolerance)
    return _place_positives(database.positions, queries.positions)


def _radius_positives(database: ImageSet, queries: ImageSet, radius: float, chunk: int) -> list[np.ndarray]:
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
