"""Files written for each localized photo: ``<stem>.json``, ``<stem>_matches.png`` (query + top
matches, green = agrees with the estimate), ``<stem>_inliers.png`` (with a re-ranker that exposes
``matches()``: the verified matches to the best candidate) and ``<stem>_map.png``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from placerank.errors import DataError
from placerank.utils import atomic_path

SUMMARY_COLUMNS = [
    "photo",
    "lat",
    "lon",
    "easting",
    "northing",
    "utm_zone",
    "confidence",
    "best_match",
    "best_similarity",
    "json",
]


def format_distance(metres: float | None) -> str:
    """'0.27 m', '14 m', '1012.9 km'; '' when unknown."""
    if metres is None:
        return ""
    if metres < 10:
        return f"{metres:.2f} m"
    if metres < 1000:
        return f"{metres:.0f} m"
    return f"{metres / 1000:.1f} km"


def unique_stem(out_dir: Path, stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when several photos share a name in one run."""
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name)
    return name


def expand_photos(items: Sequence[Path]) -> list[Path]:
    """Photos named on the command line, folders expanded (an empty folder is one-line error; a
    missing or unreadable file is left for the per-photo report)."""
    from placerank.localize.folder import list_photos

    out: list[Path] = []
    for item in items:
        if item.is_dir():
            found = list_photos(item)
            if not found:
                raise DataError(f"{item}: no .jpg/.jpeg/.png photos found")
            out.extend(found)
        else:
            out.append(item)
    return out


def summary_row(photo: Path, result, written: list[Path]) -> list:
    """One ``summary.csv`` row (:data:`SUMMARY_COLUMNS`) for a localized photo."""
    best = result.matches[0] if result.matches else None
    return [
        str(photo),
        result.lat,
        result.lon,
        result.easting,
        result.northing,
        result.utm_zone,
        result.confidence,
        best.path if best else "",
        best.similarity if best else "",
        written[0].name,
    ]


def write_summary(out_dir: str | Path, rows: list[list]) -> Path:
    """``OUT/summary.csv``: one row per localized photo, written atomically."""
    path = Path(out_dir) / "summary.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_COLUMNS)
        w.writerows(rows)
    return path


def write_outputs(
    db, result, out_dir: str | Path, stem: str | None = None, pictures: bool = True, top: int = 5
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or Path(result.query).stem
    json_path = out_dir / f"{stem}.json"
    written = [json_path]
    if pictures:
        written += _pictures(db, result, out_dir, stem, top)
    result.save_json(json_path)  # last: picture notes end up in it
    return written


def _pictures(db, result, out_dir: Path, stem: str, top: int) -> list[Path]:
    written = []
    from placerank.viz.examples import draw_example

    shown = result.matches[:top]
    if shown:
        labels = [f"#{m.rank} {Path(m.path).name} {format_distance(m.distance_m)}" for m in shown]
        path = out_dir / f"{stem}_matches.png"
        draw_example(
            Path(result.query),
            [Path(m.path) for m in shown],
            [m.agrees for m in shown],
            path,
            labels=labels,
            title=f"{Path(result.query).name}: top-{len(shown)}{' after ' + result.rerank if result.rerank else ''}"
            f" (green = within {result.radius_m:g} m of the estimate)",
        )
        written.append(path)
    path = out_dir / f"{stem}_inliers.png"
    try:
        if draw_best_match(result, path):
            written.append(path)
    except DataError as e:  # the database photo was moved or deleted since indexing
        result.notes.append(f"inlier picture not drawn: {e}")
    if result.found:
        from placerank.viz.maps import draw_map

        path = out_dir / f"{stem}_map.png"
        draw_map(map_data(result, db.positions(result.extras.get("ref_epsg"))), path)
        written.append(path)
    return written


def draw_best_match(result, path: Path, query_name: str | None = None, best_name: str | None = None) -> bool:
    """With a re-ranker that exposes its matches: draw the verified matches between the query and
    its best candidate to ``path`` (``<photo>_inliers.png`` here, the service's match picture).
    The title names the photos by ``query_name`` / ``best_name`` (default: their file names).
    False when there is nothing to draw; :class:`DataError` when a photo cannot be read."""
    reranker = result.extras.get("reranker")
    if reranker is None or not hasattr(reranker, "matches") or not result.matches:
        return False
    from placerank.viz.matches import draw_matches

    qlf, blf = result.extras["query_lf"], result.extras["cand_lf"][0]
    pairs = reranker.matches(qlf, blf)
    draw_matches(
        result.query,
        result.matches[0].path,
        qlf.keypoints,
        blf.keypoints,
        pairs,
        path,
        title=f"{reranker.name}: {len(pairs)} verified matches, "
        f"{query_name or Path(result.query).name} vs #1 {best_name or Path(result.matches[0].path).name}",
    )
    return True


def map_data(result, database: np.ndarray):
    """The plain numbers :func:`placerank.viz.maps.draw_map` draws for ``result`` (which has an
    estimate); ``database``: (N,2) metres of every database photo in the result's frame."""
    from placerank.viz.maps import MapData

    where = (
        f"{result.lat:.6f}, {result.lon:.6f}"
        if result.lat is not None
        else f"E {result.easting:.2f} m, N {result.northing:.2f} m"
    )
    gps = result.extras.get("query_gps_en")
    return MapData(
        label=f"{Path(result.query).name}: {where}",
        estimate=(result.easting, result.northing),
        radius_m=result.radius_m,
        confidence=result.confidence,
        matches=np.asarray(result.extras["positions"], dtype=np.float64),
        agrees=[m.agrees for m in result.matches],
        weights=[m.weight for m in result.matches],
        database=database,
        frame="UTM " + result.utm_zone if result.utm_zone else "local frame",
        truth=None if result.query_gps is None or gps is None else (float(gps[0]), float(gps[1])),
        truth_error_m=None if result.query_gps is None else result.query_gps.error_m,
    )
