"""The one dataset shape every command works on.

An :class:`ImageSet` is an ordered list of images with *where* each was taken, given in exactly
one of three ways: metric positions (UTM easting/northing in metres), frame indices of a
frame-aligned traversal, or place identifiers; or not at all (``kind='none'``: unlabelled images,
which eval retrieves for but never scores). A :class:`Dataset` pairs a database set with a
query set and a :class:`PositiveRule`; ground truth is always *computed* from the positions by
that rule (see :mod:`placerank.data.positives`), never read from opaque arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placerank.data.positives import PositionKind, PositiveRule, compute_positives
from placerank.errors import DataError

__all__ = ["Dataset", "ImageSet", "PositionKind", "PositiveRule"]


@dataclass
class ImageSet:
    """Images plus their positions, in a fixed order (index i = ``paths[i]``).

    ``positions`` is ``(N, 2)`` float64 metres for ``kind='utm'``, ``(N,)`` int64 for ``'frame'``
    ``(N,)`` of strings/ints for ``'place'`` and ``(N,)`` zeros for ``'none'`` (unlabelled). ``utm_zone`` is kept when positions came from
    lat/lon, because distances across zones are meaningless. ``latlon`` is ``(N, 2)`` WGS84
    degrees where known (for maps and localisation output).
    """

    paths: list[Path]
    kind: PositionKind
    positions: np.ndarray
    source: str = ""
    utm_zone: np.ndarray | None = None
    latlon: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        if len(self.positions) != len(self.paths):
            raise DataError(
                f"{self.source or 'image set'}: {len(self.paths)} images but {len(self.positions)} positions"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(
            paths=[self.paths[i] for i in idx],
            kind=self.kind,
            positions=self.positions[idx],
            source=self.source,
            utm_zone=None if self.utm_zone is None else self.utm_zone[idx],
            latlon=None if self.latlon is None else self.latlon[idx],
        )


@dataclass
class Dataset:
    """A database set, a query set and the rule that links them. ``protocol`` records what the
    reader applied (layout, query subset, radius, positives rule) for ``results.json``."""

    database: ImageSet
    queries: ImageSet
    rule: PositiveRule
    name: str = "dataset"
    protocol: dict = field(default_factory=dict)
    _positives: list[np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.database) == 0:
            raise DataError(f"{self.database.source or 'database'}: the database is empty (no images found)")
        if len(self.queries) == 0:
            raise DataError(f"{self.queries.source or 'queries'}: no query images found")
        if self.database.kind != self.queries.kind:
            raise DataError(
                f"database positions are '{self.database.kind}' but query positions are "
                f"'{self.queries.kind}': both sides need the same kind of position"
            )
        if self.rule.kind != self.database.kind:
            raise DataError(f"positive rule '{self.rule.kind}' does not fit '{self.database.kind}' positions")

    @property
    def labelled(self) -> bool:
        return self.rule.kind != "none"

    def describe(self) -> dict:
        """The protocol for ``results.json``: what the reader applied, plus the positives rule."""
        return {**self.protocol, "positives": self.rule.describe(), "labelled": self.labelled}

    @property
    def positives(self) -> list[np.ndarray]:
        """Per query, the sorted database indices that count as correct (computed once)."""
        if self._positives is None:
            self._positives = compute_positives(self.database, self.queries, self.rule)
        return self._positives
