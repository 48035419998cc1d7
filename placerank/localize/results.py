"""What the localize database answers: the report of an ``index`` run or a removal, and the
estimate for one photo (saved as ``<photo>.json``; its fields are that file's schema).

The saved JSON is always strict JSON: a number that is not finite (NaN, inf) is written as
``null``, never as a bare ``NaN`` / ``Infinity`` that JSON readers refuse."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from placerank.utils import atomic_path


def finite_json(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays as Python values, paths as strings, tuples as lists and
    every non-finite float (NaN, inf) as ``None``: safe for ``json.dumps(..., allow_nan=False)``."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_strict_json(path: str | Path, obj: Any) -> None:
    """Atomic write of ``obj`` as strict JSON (non-finite numbers become ``null``)."""
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


@dataclass
class IndexReport:
    """What one ``index`` run did; every skipped or failed photo is listed with its reason."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # content changed: re-extracted
    unchanged: int = 0
    touched: list[str] = field(default_factory=list)  # mtime changed, same sha256: nothing extracted
    position_updated: list[str] = field(default_factory=list)
    reused: int = 0  # same content already indexed under another path
    extracted: int = 0  # global descriptors computed this run
    local_extracted: int = 0
    no_position: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    missing_on_disk: list[str] = field(default_factory=list)
    not_in_csv: int = 0
    total: int = 0  # images in the database afterwards

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{self.unchanged} unchanged"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.no_position:
            parts.append(f"{len(self.no_position)} skipped (no position)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts) + f"; {self.total} images in the database"


@dataclass
class RemoveReport:
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


@dataclass
class Match:
    """One of the top database photos for a query."""

    rank: int
    path: str
    similarity: float  # cosine similarity of the global descriptors
    rerank_score: float | None  # re-ranker score (e.g. RANSAC inliers); None without --rerank
    weight: float  # weight in the position estimate (0 = no position)
    agrees: bool  # within radius of the place-defining best match
    distance_m: float | None  # metres from the estimate
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None
    utm_zone: str
    id: int | None = None  # the database row id (``placerank serve``'s /v1/places/{id})


@dataclass
class QueryGps:
    """The query photo's own EXIF GPS, when it has one: a check of the estimate, not an input."""

    lat: float
    lon: float
    error_m: float | None  # metres between the estimate and this GPS


@dataclass
class LocalizeResult:
    """Where a photo was taken, as estimated from the database (see :mod:`.estimate`)."""

    query: str
    frame: str  # 'wgs84' (lat/lon + UTM) or 'local' (metres only)
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None
    utm_zone: str  # e.g. '33N'; '' in a local frame
    confidence: float
    share: float
    margin: float | None
    margin_factor: float
    radius_m: float
    matches: list[Match]
    model: str
    weights_id: str
    rerank: str | None
    database: str
    database_size: int
    query_gps: QueryGps | None = None
    precision: str = "fp32"  # the database's (and so the query's) extraction precision
    timing_s: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict, repr=False, compare=False)  # pictures only; not saved

    @property
    def found(self) -> bool:
        return self.easting is not None

    def to_json(self) -> dict:
        """The saved fields in declaration order (``extras`` left out, and never deep-copied);
        strict JSON values: a non-finite number is ``None`` (:func:`finite_json`)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extras"}
        d["matches"] = [asdict(m) for m in self.matches]
        d["query_gps"] = None if self.query_gps is None else asdict(self.query_gps)
        d["timing_s"], d["notes"] = dict(self.timing_s), list(self.notes)
        return finite_json(d)

    def save_json(self, path: str | Path) -> None:
        write_strict_json(path, self.to_json())
