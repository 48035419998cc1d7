"""Mapillary Street-Level Sequences (MSLS) as it unpacks from the official download.

Layout (``mapillary/mapillary_sls`` README)::

    train_val/<city>/{database,query}/
        images/<key>.jpg
        postprocessed.csv   key + UTM easting/northing (+ night, view direction, ...)
        raw.csv             key, lon, lat, ca, captured_at, pano
        seq_info.csv        key, sequence_key, frame_number
        subtask_index.csv   key + one boolean column per subtask

The image-to-image validation protocol (the one SelaVPR and FoL report as "MSLS-val": cities
``cph`` and ``sf``, 740 queries): sequence length 1, panoramas excluded on both sides
(``raw.csv`` ``pano``), both sides filtered by the subtask column of ``subtask_index.csv``,
positives within 25 m computed from the UTM coordinates, and queries without any positive
dropped. Cities never match each other (each city is its own zone).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet
from placerank.data.geo import latlon_to_utm
from placerank.data.positives import PositiveRule, compute_positives
from placerank.errors import DataError

SUBTASKS = ("all", "summer2winter", "winter2summer", "day2night", "night2day", "old2new", "new2old")
VAL_CITIES = ("cph", "sf")
SIDES = ("database", "query")


def is_msls_side(folder: Path) -> bool:
    """A city's ``database`` or ``query`` folder (its ``images/`` subfolder is accepted too)."""
    folder = _side_folder(folder)
    return (folder / "postprocessed.csv").exists() or (folder / "raw.csv").exists()


def _side_folder(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent if folder.name == "images" else folder


def find_cities(root: Path, cities: tuple[str, ...] | None = None) -> list[Path]:
    """City folders under an MSLS root (``ROOT``, ``ROOT/train_val`` or one city folder)."""
    root = Path(root)
    if all(is_msls_side(root / s) for s in SIDES):
        return [root]
    base = root / "train_val" if (root / "train_val").is_dir() else root
    found = sorted(p for p in base.iterdir() if p.is_dir() and all(is_msls_side(p / s) for s in SIDES))
    if not found:
        raise DataError(f"{root}: no MSLS city folders (<city>/database and <city>/query with postprocessed.csv)")
    wanted = cities if cities is not None else tuple(c for c in VAL_CITIES if (base / c).is_dir()) or None
    if wanted is None:
        return found
    missing = [c for c in wanted if not (base / c).is_dir()]
    if missing:
        raise DataError(f"{base}: MSLS city folder(s) {', '.join(missing)} missing (unpack train_val/<city>/)")
    return [base / c for c in wanted]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]


def _true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "1.0", "yes")


def read_side(folder: Path, subtask: str, exclude_panos: bool = True) -> tuple[list[Path], np.ndarray, dict]:
    """(image paths, (N, 2) UTM metres, counts) of one side after the pano and subtask filters."""
    folder = _side_folder(folder)
    post = folder / "postprocessed.csv"
    raw = folder / "raw.csv"
    rows = _read_csv(post) if post.exists() else _read_csv(raw)
    if not rows:
        raise DataError(f"{post if post.exists() else raw}: lists no images")
    if "easting" in rows[0] and "northing" in rows[0]:
        try:
            en = np.array([[float(r["easting"]), float(r["northing"])] for r in rows], dtype=np.float64)
        except ValueError as e:
            raise DataError(f"{post}: an easting/northing value is not a number ({e})") from None
    elif "lat" in rows[0] and "lon" in rows[0]:
        en, _ = latlon_to_utm(np.array([[float(r["lat"]), float(r["lon"])] for r in rows], dtype=np.float64))
    else:
        raise DataError(f"{post}: needs easting,northing columns (or lat,lon in raw.csv)")
    keys = [r["key"] for r in rows]
    keep = np.ones(len(keys), dtype=bool)
    counts = {"listed": len(keys)}
    if exclude_panos and raw.exists():
        pano = {r["key"]: _true(r.get("pano", "")) for r in _read_csv(raw)}
        keep &= np.array([not pano.get(k, False) for k in keys])
        counts["panoramas_dropped"] = int(sum(pano.get(k, False) for k in keys))
    index = folder / "subtask_index.csv"
    if subtask != "all" or index.exists():
        if not index.exists():
            raise DataError(f"{index}: missing; --msls-subtask {subtask} needs MSLS's subtask_index.csv")
        sub = _read_csv(index)
        if sub and subtask not in sub[0]:
            raise DataError(f"{index}: no '{subtask}' column (subtasks: {', '.join(SUBTASKS)})")
        member = {r["key"]: _true(r[subtask]) for r in sub}
        keep &= np.array([member.get(k, False) for k in keys])
    paths = [folder / "images" / f"{k}.jpg" for k in keys]
    idx = np.flatnonzero(keep)
    missing = [paths[i] for i in idx if not paths[i].exists()]
    if missing:
        raise DataError(f"{folder}: {len(missing)} image(s) listed in {post.name} are missing, e.g. {missing[0]}")
    counts["kept"] = len(idx)
    return [paths[i] for i in idx], en[idx], counts


def read_msls(
    cities: list[Path], subtask: str = "all", radius: float = 25.0, keep_queries_without_positives: bool = False
) -> Dataset:
    """The MSLS image-to-image protocol over one or more city folders."""
    if subtask not in SUBTASKS:
        raise DataError(f"unknown MSLS subtask '{subtask}'; known: {', '.join(SUBTASKS)}")
    sides: dict[str, list] = {s: [[], [], []] for s in SIDES}
    per_city: dict[str, dict] = {}
    for c, city in enumerate(cities):
        for side in SIDES:
            paths, en, counts = read_side(city / side, subtask)
            sides[side][0].extend(paths)
            sides[side][1].append(en)
            sides[side][2].append(np.full(len(paths), c, dtype=np.int64))
            per_city.setdefault(city.name, {})[side] = counts

    def image_set(side: str) -> ImageSet:
        paths, en, zone = sides[side]
        return ImageSet(
            paths, "utm", np.concatenate(en).reshape(-1, 2), source=f"MSLS {side}", utm_zone=np.concatenate(zone)
        )

    db, q = image_set("database"), image_set("query")
    rule = PositiveRule("utm", radius=radius)
    dropped = 0
    if not keep_queries_without_positives and len(q):
        has = np.flatnonzero([len(p) > 0 for p in compute_positives(db, q, rule)])
        dropped = len(q) - len(has)
        q = q.subset(has)
    names = ",".join(c.name for c in cities)
    protocol = {
        "layout": "msls",
        "root": str(cities[0].parent),
        "cities": [c.name for c in cities],
        "subtask": subtask,
        "sequence_length": 1,
        "panoramas": "excluded (raw.csv pano)",
        "radius_m": radius,
        "queries_without_positives": "kept" if keep_queries_without_positives else f"dropped ({dropped})",
        "counts": per_city,
    }
    return Dataset(db, q, rule, name=f"msls:{names}:{subtask}", protocol=protocol)


def read_msls_pair(database: Path, queries: Path, subtask: str = "all", radius: float = 25.0) -> Dataset:
    """``--database <city>/database --queries <city>/query``: the same city's two sides."""
    db_city, q_city = _side_folder(database).parent, _side_folder(queries).parent
    if db_city.resolve() != q_city.resolve():
        raise DataError(f"MSLS: {database} and {queries} are from different cities; pick one city's two folders")
    if _side_folder(database).name != "database" or _side_folder(queries).name != "query":
        raise DataError(f"MSLS: give --database {db_city}/database and --queries {db_city}/query")
    return read_msls([db_city], subtask, radius)
