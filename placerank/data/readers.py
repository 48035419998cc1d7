"""Readers that turn a folder or a CSV into an :class:`ImageSet`.

Supported layouts (auto-detected by :func:`read_image_set`):

- **CSV manifest**: a ``path`` column (relative to the CSV's folder) plus exactly one position
  group: ``easting,northing`` (metres), ``lat,lon`` (WGS84, converted to UTM with pyproj),
  ``frame`` (int) or ``place_id``.
- **@UTM@ folder** (gmberton layout): file names ``@UTM_east@UTM_north@...@.jpg``.
- **Frame-aligned traversal folder** (GardensPoint, Nordland, corridor): the k-th image in
  sorted file-name order is frame k, so the same index is the same place in every traversal.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from placerank.data.dataset import Dataset, ImageSet, PositiveRule
from placerank.data.geo import latlon_to_utm
from placerank.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
POSITION_GROUPS = (("easting", "northing"), ("lat", "lon"), ("frame",), ("place_id",))


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    files = sorted(
        p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    return files


def read_csv_manifest(csv_path: str | Path) -> ImageSet:
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError(f"{csv_path}: CSV file does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "path" not in columns:
        raise DataError(f"{csv_path}: CSV needs a 'path' column (found: {', '.join(columns) or 'none'})")
    groups = [g for g in POSITION_GROUPS if all(c in columns for c in g)]
    if not groups:
        raise DataError(
            f"{csv_path}: CSV has no known position column; add one of: easting,northing | lat,lon | frame | place_id"
        )
    if len(groups) > 1:
        names = " and ".join(",".join(g) for g in groups)
        raise DataError(f"{csv_path}: CSV has several position columns ({names}); keep exactly one")
    group = groups[0]
    if not rows:
        raise DataError(f"{csv_path}: CSV lists no images")
    base = csv_path.parent
    paths = [(base / r["path"]).resolve() for r in rows]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    try:
        if group == ("easting", "northing"):
            pos = np.array([[float(r["easting"]), float(r["northing"])] for r in rows], dtype=np.float64)
            return ImageSet(paths, "utm", pos, source=str(csv_path))
        if group == ("lat", "lon"):
            latlon = np.array([[float(r["lat"]), float(r["lon"])] for r in rows], dtype=np.float64)
            bad = (np.abs(latlon[:, 0]) > 90) | (np.abs(latlon[:, 1]) > 180)
            if bad.any():
                raise DataError(f"{csv_path}: row {int(np.argmax(bad)) + 2} has lat/lon out of range")
            en, zones = latlon_to_utm(latlon)
            return ImageSet(paths, "utm", en, source=str(csv_path), utm_zone=zones, latlon=latlon)
        if group == ("frame",):
            pos = np.array([int(r["frame"]) for r in rows], dtype=np.int64)
            return ImageSet(paths, "frame", pos, source=str(csv_path))
        pos = np.array([r["place_id"] for r in rows], dtype=object)
        return ImageSet(paths, "place", pos, source=str(csv_path))
    except ValueError as e:
        raise DataError(f"{csv_path}: a value in column(s) {','.join(group)} is not a number ({e})") from None


def parse_utm_name(path: Path) -> tuple[float, float] | None:
    """``@east@north@...`` -> (east, north); None if the name is not in that layout."""
    fields = path.name.split("@")
    if len(fields) < 3:
        return None
    try:
        return float(fields[1]), float(fields[2])
    except ValueError:
        return None


def read_utm_folder(folder: str | Path) -> ImageSet:
    files = list_images(folder)
    if not files:
        raise DataError(f"{folder}: no images found")
    pos = []
    for p in files:
        en = parse_utm_name(p)
        if en is None:
            raise DataError(f"{p}: file name is not in the @UTM_east@UTM_north@...@ layout")
        pos.append(en)
    return ImageSet(files, "utm", np.array(pos, dtype=np.float64), source=str(folder))


def read_traversal_folder(folder: str | Path) -> ImageSet:
    files = list_images(folder, recursive=False)
    if not files:
        raise DataError(f"{folder}: no images found")
    return ImageSet(files, "frame", np.arange(len(files), dtype=np.int64), source=str(folder))


def read_image_set(spec: str | Path, layout: str = "auto") -> ImageSet:
    """Read a folder or CSV. ``layout``: auto | csv | utm | traversal."""
    spec = Path(spec)
    if layout == "csv" or (layout == "auto" and spec.suffix.lower() == ".csv"):
        return read_csv_manifest(spec)
    if not spec.exists():
        raise DataError(f"{spec}: folder does not exist")
    if spec.is_file():
        raise DataError(f"{spec}: expected a folder of images or a .csv manifest")
    if layout == "utm":
        return read_utm_folder(spec)
    if layout == "traversal":
        return read_traversal_folder(spec)
    files = list_images(spec)
    if not files:
        raise DataError(f"{spec}: no images found")
    if all(parse_utm_name(p) is not None for p in files):
        return read_utm_folder(spec)
    return read_traversal_folder(spec)


def make_rule(kind: str, radius: float | None = None, frame_tolerance: int | None = None) -> PositiveRule:
    if kind == "utm":
        return PositiveRule("utm", radius=25.0 if radius is None else float(radius))
    if kind == "frame":
        return PositiveRule("frame", frame_tolerance=0 if frame_tolerance is None else int(frame_tolerance))
    return PositiveRule("place")


def load_dataset(
    database: str | Path,
    queries: str | Path,
    radius: float | None = None,
    frame_tolerance: int | None = None,
    layout: str = "auto",
    name: str | None = None,
) -> Dataset:
    """Read both sides and build the positive rule that fits their positions."""
    if radius is not None and frame_tolerance is not None:
        raise DataError("give either --radius (metres) or --frame-tolerance (frames), not both")
    db = read_image_set(database, layout)
    q = read_image_set(queries, layout)
    if radius is not None and db.kind != "utm":
        raise DataError(f"--radius needs metric positions, but {database} has '{db.kind}' positions")
    if frame_tolerance is not None and db.kind != "frame":
        raise DataError(f"--frame-tolerance needs frame indices, but {database} has '{db.kind}' positions")
    rule = make_rule(db.kind, radius, frame_tolerance)
    return Dataset(db, q, rule, name=name or f"{Path(database).name}->{Path(queries).name}")
