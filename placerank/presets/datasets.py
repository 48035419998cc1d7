"""Dataset presets: a named database/query pair with its positive rule and demo settings.

``placerank demo --preset gardens-night`` (the default) is GardensPoint Walking ``day_right``
(database, 140 frames) against ``night_right`` (queries), positives ``|i-j| <= 2``, the default
model, the top-10 re-ranked with RANSAC on XFeat matches when that re-ranker is installed.
Folders are relative to the shared data folder (:func:`placerank.data.places.find_shared_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placerank.data.places import find_shared_data
from placerank.presets import register_preset


@dataclass(frozen=True)
class DatasetPreset:
    """A database/query pair (relative to the shared data folder) and how to evaluate it."""

    database: str
    queries: str
    database_label: str = "database"
    queries_label: str = "queries"
    frame_tolerance: int | None = None
    radius: float | None = None
    model: str = "effnet-lite0-gem"
    rerank: str = "auto"  # a re-ranker name, "auto" (ransac-xfeat if installed) or "none"
    top_k: int = 10

    def data_root(self, explicit: str | Path | None = None) -> Path:
        return find_shared_data(explicit, marker=Path(self.database).parts[0])

    def paths(self, explicit: str | Path | None = None) -> tuple[Path, Path]:
        """(database, queries) as absolute paths under the shared data folder."""
        root = self.data_root(explicit)
        return root / self.database, root / self.queries

    def rule(self) -> str:
        if self.frame_tolerance is not None:
            return f"|i-j| <= {self.frame_tolerance}"
        return f"distance <= {25.0 if self.radius is None else self.radius:g} m"


def resolve_rerank(name: str | None) -> str | None:
    """ "auto" -> ``ransac-xfeat`` when registered (else none); "none" -> None."""
    from placerank.rerank.base import RERANKERS

    if name == "auto":
        return "ransac-xfeat" if "ransac-xfeat" in RERANKERS else None
    return None if name in (None, "none") else name


@register_preset("gardens-night", "GardensPoint Walking day_right -> night_right, |i-j| <= 2 (the demo)", "dataset")
def gardens_night() -> DatasetPreset:
    return DatasetPreset(
        "gardenspoint_walking/day_right", "gardenspoint_walking/night_right", "day", "night", frame_tolerance=2
    )


@register_preset("gardens-day", "GardensPoint Walking day_left -> day_right (lateral shift), |i-j| <= 2", "dataset")
def gardens_day() -> DatasetPreset:
    return DatasetPreset(
        "gardenspoint_walking/day_left", "gardenspoint_walking/day_right", "day, left", "day, right", frame_tolerance=2
    )
