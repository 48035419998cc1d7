"""Place-labelled training images: every reader the training methods use.

A training *spec* (one ``--train`` value) is one of

- a CSV manifest with a ``place_id`` or ``frame`` column (:func:`~placerank.data.readers.read_csv_manifest`);
- a frame-aligned traversal folder: frame k of every traversal folder of one route is place k;
- a Nordland root (``frames.csv`` + ``database_summer/`` + ``queries_winter/``), optionally with a
  selection ``ROOT?places=N&start=S&step=K`` (:func:`read_nordland_places`);
- a GSV-Cities root (``Dataframes/`` + ``Images/``, :mod:`placerank.data.gsv_cities`), read by
  :func:`read_training_set`.

Specs of a recipe preset are written relative to the shared data folder (:func:`find_shared_data`,
:func:`resolve_data_spec`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet
from placerank.data.readers import list_images, read_csv_manifest
from placerank.errors import DataError

_REPO = Path(__file__).resolve().parents[2]
NORDLAND_KEYS = ("places", "start", "step")


# ---------------------------------------------------------------------------------------------
# The shared data folder and specs relative to it
# ---------------------------------------------------------------------------------------------


def find_shared_data(explicit: str | Path | None = None, marker: str = "gardenspoint_walking") -> Path:
    """The shared data folder: ``explicit``, else ``$PLACERANK_DATA``, else
    ``$PLACERANK_SHARED/data``, else ``../shared/data`` beside the working directory or the
    repository (the first one holding ``marker``)."""
    cands = [Path(explicit)] if explicit else []
    if os.environ.get("PLACERANK_DATA"):
        cands.append(Path(os.environ["PLACERANK_DATA"]))
    if os.environ.get("PLACERANK_SHARED"):
        cands.append(Path(os.environ["PLACERANK_SHARED"]) / "data")
    cands += [Path.cwd().parent / "shared" / "data", _REPO.parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    for c in cands:
        if (c / marker).is_dir():
            return c
    raise DataError(f"shared data not found: pass --data DIR (the folder holding {marker}/) or set PLACERANK_DATA")


def resolve_data_spec(spec: str, root: Path) -> str:
    """``spec`` (possibly with a ``?selection``) with a relative path made absolute under ``root``."""
    path, sep, query = str(spec).partition("?")
    p = Path(path)
    return str(p if p.is_absolute() else root / p) + sep + query


def split_spec(spec: str | Path) -> tuple[Path, dict[str, int]]:
    """``"ROOT?places=300&step=3"`` -> ``(Path("ROOT"), {"places": 300, "step": 3})``."""
    path, _, query = str(spec).partition("?")
    params: dict[str, int] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in NORDLAND_KEYS or not eq:
            raise DataError(f"{spec}: unknown selection '{part}' (known: {', '.join(NORDLAND_KEYS)}, as KEY=N)")
        try:
            params[key] = int(value)
        except ValueError:
            raise DataError(f"{spec}: selection {key} expects a whole number, got '{value}'") from None
    return Path(path), params


# ---------------------------------------------------------------------------------------------
# Nordland (summer + winter): two views per place
# ---------------------------------------------------------------------------------------------


def is_nordland_root(spec: str | Path) -> bool:
    p = Path(str(spec).partition("?")[0])
    return p.is_dir() and (p / "frames.csv").is_file() and (p / "database_summer").is_dir()


def read_nordland_places(root: str | Path, places: int = 0, start: int = 0, step: int = 0) -> ImageSet:
    """Nordland places (summer + winter views), frames with ``index >= start`` and
    ``low_texture == 0`` (no tunnels or black frames), every ``step``-th (0: spread ``places``
    evenly), at most ``places`` (0: all). Place ``nl<index>``."""
    root = Path(root)
    with open(root / "frames.csv", newline="") as f:
        good = [r for r in csv.DictReader(f) if int(r["index"]) >= start and r["low_texture"] == "0"]
    if step <= 0:
        step = max(1, len(good) // places) if places > 0 else 1
    chosen = good[::step][:places] if places > 0 else good[::step]
    paths, labels = [], []
    for r in chosen:
        for season in ("database_summer", "queries_winter"):
            paths.append(root / season / r["file"])
            labels.append(f"nl{r['index']}")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{missing[0]}: Nordland image listed in frames.csv does not exist")
    if not paths:
        raise DataError(f"{root}: no Nordland frame matches the selection")
    return ImageSet(paths, "place", np.array(labels, dtype=object), source=str(root))


# ---------------------------------------------------------------------------------------------
# Traversal folders, CSV manifests and Nordland roots
# ---------------------------------------------------------------------------------------------


def read_training_places(specs: Sequence[str | Path], frames: tuple[int, int] | None = None) -> ImageSet:
    """Images labelled by place.

    Each spec is a CSV manifest with ``place_id`` (or ``frame``), a frame-aligned traversal
    folder (frame k of every traversal folder is place ``k``, so several traversals of one route
    give K views per place) or a Nordland root. ``frames=(a, b)`` keeps frames a <= k < b (to
    hold some out); it does not apply to place ids.
    """
    paths: list[Path] = []
    labels: list[str] = []
    routes = {Path(s).resolve().parent for s in specs if Path(s).suffix.lower() != ".csv" and not is_nordland_root(s)}
    if len(routes) > 1:
        # Frame k of a GardensPoint traversal and frame k of a Nordland one are different places;
        # numbering them alike would silently make them positives of each other.
        raise DataError(
            "traversal folders from different routes ("
            + ", ".join(sorted(str(r) for r in routes))
            + ") would share frame numbers as places; train on one route per call or use place_id CSVs"
        )
    for spec in specs:
        if is_nordland_root(spec):
            root, params = split_spec(spec)
            s = read_nordland_places(root, **params)
            paths += s.paths
            labels += s.positions.tolist()
            continue
        spec = Path(spec)
        if spec.suffix.lower() == ".csv":
            s = read_csv_manifest(spec)
            if s.kind not in ("place", "frame"):
                raise DataError(f"{spec}: training needs a place_id or frame column, found '{s.kind}' positions")
            keep = np.arange(len(s))
            if frames is not None and s.kind == "frame":
                keep = keep[(s.positions >= frames[0]) & (s.positions < frames[1])]
            paths += [s.paths[i] for i in keep]
            labels += [str(s.positions[i]) for i in keep]
        else:
            files = list_images(spec, recursive=False)
            if not files:
                raise DataError(f"{spec}: no images found")
            for k, p in enumerate(files):
                if frames is None or frames[0] <= k < frames[1]:
                    paths.append(p)
                    labels.append(str(k))
    if not paths:
        raise DataError("training set is empty after applying the frame range")
    return ImageSet(paths, "place", np.array(labels, dtype=object), source=",".join(map(str, specs)))


def spec_kind(spec: str | Path) -> str:
    """'frame' (traversal folder, frame CSV) or 'place' (place_id CSV, Nordland root)."""
    if is_nordland_root(spec):
        return "place"
    p = Path(spec)
    if p.suffix.lower() == ".csv":
        return "frame" if read_csv_manifest(p).kind == "frame" else "place"
    return "frame"


def read_training_set(
    specs: Sequence[str | Path],
    frames: tuple[int, int] | None = None,
    gsv_cities: Sequence[str] | None = None,
    gsv_min_images: int = 4,
    gsv_images_per_place: int | None = None,
) -> ImageSet:
    """Place-labelled images from traversal folders / CSVs / Nordland roots and GSV-Cities roots
    (``gsv_cities``: city names to use, default all; ``gsv_images_per_place``: keep that many most
    recent images per place, FoL's official choice, None: all); sets are kept apart by a ``k:``
    prefix."""
    from placerank.data.gsv_cities import is_gsv_cities_root, read_gsv_cities

    gsv = [s for s in specs if is_gsv_cities_root(s)]
    other = [s for s in specs if not is_gsv_cities_root(s)]
    sets = []
    if other:
        sets.append(read_training_places(other, frames))
    for root in gsv:
        sets.append(
            read_gsv_cities(root, list(gsv_cities) if gsv_cities else None, gsv_min_images, gsv_images_per_place)
        )
    if len(sets) == 1:
        return sets[0]
    paths = [p for s in sets for p in s.paths]
    labels = np.array([f"{k}:{l}" for k, s in enumerate(sets) for l in s.positions.tolist()], dtype=object)
    return ImageSet(paths, "place", labels, source=",".join(s.source for s in sets))


@dataclass
class TrainingPlaces:
    """Place labels with the route and frame of each image (for neighbour exclusion)."""

    images: ImageSet
    labels: np.ndarray  # int64 place id per image
    routes: np.ndarray  # int64 route id per image (-1 for place ids)
    frames: np.ndarray  # int64 frame index per image (-1 for place ids)


def read_route_places(specs: Sequence[str | Path], frames: tuple[int, int] | None = None) -> TrainingPlaces:
    """Read ``--train`` specs into place-labelled images with routes.

    Traversal folders (and frame CSVs) that share a parent folder are one route: frame k of each
    is place k *of that route*. Routes in different folders (e.g. GardensPoint and Nordland)
    get separate places, so frame 5 of one never becomes a positive of frame 5 of the other.
    Place ids (CSVs, Nordland roots) keep their ids, shared across specs.
    """
    groups: dict[tuple, list[str]] = {}
    for spec in specs:
        p = Path(spec)
        kind = spec_kind(spec)
        if kind == "place":
            key: tuple = ("place", "")
        else:
            if p.suffix.lower() != ".csv" and not p.is_dir():
                raise DataError(f"{p}: training folder does not exist")
            key = ("frame", str(p.resolve().parent))
        groups.setdefault(key, []).append(str(spec))
    paths: list[Path] = []
    names: list[str] = []
    routes: list[int] = []
    frame_idx: list[int] = []
    for r, ((kind, _), group) in enumerate(groups.items()):
        s = read_training_places(group, frames)
        paths += s.paths
        if kind == "frame":
            f = [int(v) for v in s.positions.tolist()]
            names += [f"{r}:{v}" for v in f]
            routes += [r] * len(f)
            frame_idx += f
        else:
            names += [f"p:{v}" for v in s.positions.tolist()]
            routes += [-1] * len(s)
            frame_idx += [-1] * len(s)
    uniq = {n: i for i, n in enumerate(sorted(set(names)))}
    images = ImageSet(paths, "place", np.array(names, dtype=object), source=",".join(map(str, specs)))
    return TrainingPlaces(
        images,
        np.array([uniq[n] for n in names], dtype=np.int64),
        np.array(routes, dtype=np.int64),
        np.array(frame_idx, dtype=np.int64),
    )


@dataclass
class SequencePlaces:
    """Images of several specs, each image's raw label and the spec (sequence) it came from."""

    paths: list[Path]
    kind: str  # 'frame' when every spec is frame-labelled, else 'place'
    labels: list  # frame index or place id per image
    sequence: np.ndarray  # index of the spec each image came from


def read_sequences(specs: Sequence[str | Path], frames: tuple[int, int] | None = None) -> SequencePlaces:
    """Each spec read on its own (so frame k of different traversals stays apart by sequence)."""
    paths: list[Path] = []
    labels: list = []
    seq: list[int] = []
    kinds = set()
    for s_idx, spec in enumerate(specs):
        part = read_training_places([spec], frames)
        paths += part.paths
        labels += part.positions.tolist()
        seq += [s_idx] * len(part)
        kinds.add(spec_kind(spec))
    kind = "frame" if kinds == {"frame"} else "place"
    return SequencePlaces(paths, kind, labels, np.array(seq, dtype=np.int64))


def keep_frames(dataset: Dataset, frames: tuple[int, int] | None) -> Dataset:
    """The database/query pair restricted to frames a <= k < b on both sides (a validation split)."""
    if frames is None:
        return dataset
    a, b = int(frames[0]), int(frames[1])
    if dataset.database.kind != "frame":
        raise DataError(f"{dataset.name}: a frame range needs frame positions, found '{dataset.database.kind}'")

    def cut(s: ImageSet) -> ImageSet:
        return s.subset(np.flatnonzero((s.positions >= a) & (s.positions < b)))

    return Dataset(cut(dataset.database), cut(dataset.queries), dataset.rule, name=f"{dataset.name}[{a}:{b}]")
