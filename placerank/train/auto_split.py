"""The automatic validation split of ``placerank train --method M --train DATA``.

Why: every method picks its best epoch (and stops early) on a validation pair, but a user's data
rarely comes with one, and a split made by hand is easy to leak (a validation query whose
neighbouring frame was trained on is not unseen). So when no ``val_database`` / ``val_queries``
option is given, part of the user's own data is held out here, the same way the measured
``selavpr-cpu`` recipe held out frames 80-99:

- frame-aligned data (traversal folders, ``path,frame`` CSVs; several traversals of one route):
  the last ``fraction`` of the frames (at least ``min_held`` when there are enough) is held out
  across every traversal, and ``gap`` frames before it are dropped from training too, so no
  training frame is within the validation frame tolerance of a validation frame. The validation
  database is one traversal, the queries another (the first and the last given: for GardensPoint
  day_left -> night_right, the hard pair).
- place-labelled data (``path,place_id`` CSVs, Nordland roots): the last ``fraction`` of the places
  (in the order they are read: for Nordland, along the route) is held out; the first image of each
  is the validation database, the others the queries. Training reads a CSV of the rest.

Too little data (fewer than ``min_items`` frames / places) -> no validation, said in one line.
The split is written to ``RUN_DIR/split/`` (CSV files + ``split.json``) and recorded in
``config.json`` through the options it sets.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from placerank.data.dataset import ImageSet
from placerank.data.gsv_cities import is_gsv_cities_root
from placerank.data.places import is_nordland_root, read_training_places
from placerank.data.readers import list_images, read_csv_manifest
from placerank.utils import atomic_path, write_json_atomic

FRACTION = 0.15  # share of frames / places held out
MIN_HELD = 20  # at least this many validation frames / places when the data allows it
MIN_ITEMS = 30  # fewer frames / places than this: train without validation
GAP = 3  # frames dropped between training and validation (> the frame tolerance below)
FRAME_TOLERANCE = 2  # validation positives: |i - j| <= 2 frames (the selavpr-cpu recipe's)


@dataclass
class AutoSplit:
    """What the split changes in the training settings, and what it held out."""

    train: list[str]  # the training specs (place specs replaced by a CSV of the kept places)
    frames: tuple[int, int] | None  # the training frame range of the frame-aligned specs
    options: dict[str, str] = field(default_factory=dict)  # val_* options for the method
    summary: dict = field(default_factory=dict)  # recorded in RUN_DIR/split/split.json and the log
    message: str = ""  # one line for the user


def held_count(n: int, fraction: float = FRACTION, min_held: int = MIN_HELD) -> int:
    """Frames / places to hold out of ``n``: ``fraction`` of them, at least ``min_held``, at most a
    third (so training keeps most of a small set)."""
    return min(max(math.ceil(fraction * n), min_held), n // 3)


def _frame_rows(spec: str) -> list[tuple[Path, int, str]]:
    """(path, frame, traversal) of a traversal folder (frame k = k-th image) or a frame CSV
    (the traversal of a row: its image's folder)."""
    p = Path(spec)
    if p.suffix.lower() == ".csv":
        s = read_csv_manifest(p)
        return [(path, int(k), str(path.parent)) for path, k in zip(s.paths, s.positions.tolist())]
    return [(path, k, str(p)) for k, path in enumerate(list_images(p, recursive=False))]


def _is_frame_spec(spec: str) -> bool:
    if is_nordland_root(spec) or is_gsv_cities_root(spec):
        return False
    p = Path(spec)
    return p.suffix.lower() != ".csv" or read_csv_manifest(p).kind == "frame"


def _write_csv(path: Path, column: str, rows: Sequence[tuple[Path, object]]) -> str:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", column])
        w.writerows((str(p), v) for p, v in rows)
    return str(path)


def split_frames(
    specs: list[str], frames: tuple[int, int] | None, folder: Path, gap: int = GAP
) -> tuple[tuple[int, int], dict[str, str], dict] | None:
    """(training frame range, val options, summary) for the frame-aligned specs; None when they
    cannot give a validation pair (one traversal only, or fewer than ``MIN_ITEMS`` frames)."""
    rows = [r for s in specs for r in _frame_rows(s)]
    if frames is not None:
        rows = [r for r in rows if frames[0] <= r[1] < frames[1]]
    traversals = list(dict.fromkeys(r[2] for r in rows))
    if len(traversals) < 2:
        return None
    per = [{r[1] for r in rows if r[2] == t} for t in traversals]
    common = sorted(set.intersection(*per))
    if len(common) < MIN_ITEMS:
        return None
    n_val = held_count(len(common))
    val_start, val_stop = common[-n_val], common[-1] + 1
    train_stop = val_start - gap
    lo = frames[0] if frames is not None else min(r[1] for r in rows)
    db_t, q_t = traversals[0], traversals[-1]
    folder.mkdir(parents=True, exist_ok=True)
    pick = lambda t: [(r[0], r[1]) for r in rows if r[2] == t and val_start <= r[1] < val_stop]  # noqa: E731
    options = {
        "val_database": _write_csv(folder / "val_database.csv", "frame", pick(db_t)),
        "val_queries": _write_csv(folder / "val_queries.csv", "frame", pick(q_t)),
        "val_frame_tolerance": str(FRAME_TOLERANCE),
    }
    summary = {
        "kind": "frames",
        "train_frames": [lo, train_stop],
        "validation_frames": [val_start, val_stop],
        "gap": gap,
        "frame_tolerance": FRAME_TOLERANCE,
        "database": db_t,
        "queries": q_t,
        "traversals": traversals,
    }
    return (lo, train_stop), options, summary


def split_places(specs: list[str], folder: Path) -> tuple[str, dict[str, str], dict] | None:
    """(training CSV, val options, summary) for place-id CSVs / Nordland roots; None when there
    are fewer than ``MIN_ITEMS`` places with two or more images."""
    places: ImageSet = read_training_places(specs)
    labels = places.positions.tolist()
    members: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    usable = [p for p, idx in members.items() if len(idx) >= 2]  # in reading order
    if len(usable) < MIN_ITEMS:
        return None
    held = set(usable[-held_count(len(usable)) :])
    folder.mkdir(parents=True, exist_ok=True)
    keep = [(places.paths[i], labels[i]) for i in range(len(labels)) if labels[i] not in held]
    db = [(places.paths[members[p][0]], p) for p in usable if p in held]
    q = [(places.paths[i], p) for p in usable if p in held for i in members[p][1:]]
    train_csv = _write_csv(folder / "train_places.csv", "place_id", keep)
    options = {
        "val_database": _write_csv(folder / "val_database.csv", "place_id", db),
        "val_queries": _write_csv(folder / "val_queries.csv", "place_id", q),
    }
    summary = {
        "kind": "places",
        "places": len(members),
        "validation_places": len(held),
        "validation_images": len(db) + len(q),
        "first_held_place": next(p for p in usable if p in held),
        "last_held_place": usable[-1],
        "specs": list(specs),
    }
    return train_csv, options, summary


def auto_split(specs: list[str], frames: tuple[int, int] | None, out: Path) -> AutoSplit:
    """Hold out validation frames (frame-aligned specs, preferred) or places (place specs) of the
    user's training data; see the module docstring. GSV-Cities roots are always trained on whole."""
    folder = Path(out) / "split"
    specs = [str(s) for s in specs]
    frame_specs = [s for s in specs if _is_frame_spec(s)]
    place_specs = [s for s in specs if s not in frame_specs and not is_gsv_cities_root(s)]
    split = split_frames(frame_specs, frames, folder) if frame_specs else None
    if split is not None:
        train_frames, options, summary = split
        a, b = summary["validation_frames"]
        message = (
            f"validation: frames {a}-{b - 1} held out ({Path(summary['database']).name} database, "
            f"{Path(summary['queries']).name} queries, +-{FRAME_TOLERANCE} frames); training on frames "
            f"{train_frames[0]}-{train_frames[1] - 1} (gap of {GAP})"
        )
        result = AutoSplit(specs, train_frames, options, summary, message)
    else:
        psplit = split_places(place_specs, folder) if place_specs else None
        if psplit is None:  # nothing written: the run folder is not created here
            return AutoSplit(
                specs,
                frames,
                {},
                {"kind": "none"},
                f"validation: none (needs {MIN_ITEMS}+ frames of two traversals or {MIN_ITEMS}+ places "
                "with two images; or give --option val_database=... --option val_queries=...); "
                "the last epoch becomes model.pt",
            )
        train_csv, options, summary = psplit
        rest = [s for s in specs if s not in place_specs]
        message = (
            f"validation: {summary['validation_places']} of {summary['places']} places held out "
            f"({summary['first_held_place']} .. {summary['last_held_place']}; first image database, others queries)"
        )
        result = AutoSplit([*rest, train_csv], frames, options, summary, message)
    result.summary["message"] = result.message
    write_json_atomic(folder / "split.json", result.summary)
    return result
