"""Per-side descriptor standardisation (``placerank eval --standardize center|zscore``).

A holistic descriptor of one traversal shares a large component with every other image of that
traversal: the season, the light, the camera. Subtracting each side's own mean descriptor (and
with ``zscore`` dividing each dimension by its own standard deviation), then L2-normalising
again, removes that shared part, so the cosine similarity compares what differs between places.
This is the *feature standardisation* of Schubert, Neubert & Protzel ("Unsupervised learning
methods for visual place recognition in discretely and continuously changing environments",
ICRA 2020) and Schubert et al. ("Visual place recognition: a tutorial", IEEE RAM 2023).

It is **transductive**: the query side's statistics come from the query set itself, so it needs
all queries (an evaluation) or, for live localization, a running mean (not implemented).

Memory stays bounded: the statistics are summed chunk by chunk (float64), and the standardised
rows are written chunk by chunk into ``out`` (a memmap for a memory-mapped input)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from placerank.errors import PlaceRankError

MODES = ("none", "center", "zscore")
CHUNK = 65536  # rows per chunk: 65536 x 1280 float32 = 335 MB at most in flight
_EPS = 1e-12


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise PlaceRankError(f"standardize must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def column_stats(descriptors: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each dimension, summed in float64 over chunks of rows (a
    memmap is read once, never copied whole)."""
    n = len(descriptors)
    if n < 2:
        raise PlaceRankError(f"standardising descriptors needs at least 2 rows per side, got {n}")
    total = np.zeros(descriptors.shape[1], np.float64)
    squares = np.zeros_like(total)
    for start in range(0, n, chunk):
        block = np.asarray(descriptors[start : start + chunk], dtype=np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / n
    var = np.maximum(squares / n - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _apply(descriptors, mean, scale, chunk: int, out: np.ndarray | None) -> np.ndarray:
    """``(x - mean) / scale`` row-normalised, chunk by chunk into ``out`` (new array if None).
    A row equal to the mean stays all zero (similarity 0 to everything) instead of NaN."""
    if out is None:
        out = np.empty(descriptors.shape, np.float32)
    for start in range(0, len(descriptors), chunk):
        block = np.asarray(descriptors[start : start + chunk], dtype=np.float32) - mean
        if scale is not None:
            block /= scale
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), _EPS)
        out[start : start + len(block)] = block
    return out


def center(
    descriptors: np.ndarray, mean: np.ndarray | None = None, chunk: int = CHUNK, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows minus ``mean`` (their own mean if None), L2-normalised: (float32 rows, mean)."""
    if mean is None:
        mean, _ = column_stats(descriptors, chunk)
    return _apply(descriptors, np.asarray(mean, np.float32), None, chunk, out), mean


def zscore(
    descriptors: np.ndarray,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    chunk: int = CHUNK,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Rows minus the mean, divided per dimension by the standard deviation (their own if None;
    a constant dimension is divided by 1), L2-normalised: (float32 rows, (mean, std))."""
    if mean is None or std is None:
        mean, std = column_stats(descriptors, chunk)
    scale = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    return _apply(descriptors, np.asarray(mean, np.float32), scale, chunk, out), (mean, std)


def standardize(descriptors: np.ndarray, mode: str, chunk: int = CHUNK, out: np.ndarray | None = None) -> np.ndarray:
    """One side standardised with its own statistics (``mode`` in :data:`MODES`)."""
    if check_mode(mode) == "none":
        return descriptors
    if mode == "center":
        return center(descriptors, chunk=chunk, out=out)[0]
    return zscore(descriptors, chunk=chunk, out=out)[0]


def standardize_sides(database, queries, mode: str, scratch: str | Path, chunk: int = CHUNK) -> tuple:
    """Database and queries (:class:`~placerank.descriptors.files.DescriptorSet` or arrays), each
    standardised with **its own side's** statistics (the query side's from the query set:
    transductive). A memory-mapped side is written into a new memmap under ``scratch`` (the
    caller's temporary folder), never copied whole into RAM. Returns (database, queries, the
    record for results.json), the sets as copies with their descriptors replaced."""
    from placerank.descriptors.files import open_rows

    sides = []
    for name, side in (("database", database), ("queries", queries)):
        desc = getattr(side, "descriptors", side)
        out = None
        if check_mode(mode) != "none" and isinstance(desc, np.memmap):
            out = open_rows(Path(scratch) / f"{name}-{mode}.npy", len(desc), desc.shape[1])
        done = standardize(desc, mode, chunk, out)
        sides.append(done if isinstance(side, np.ndarray) else dataclasses.replace(side, descriptors=done))
    info = {
        "mode": mode,
        "statistics": "per side: the database's from the database, the queries' from the query set (transductive)",
    }
    return sides[0], sides[1], info
