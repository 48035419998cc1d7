"""Positions of database photos: one record type for EXIF GPS and CSV sources.

A database holds positions in exactly one *frame*:

- ``wgs84``: every position has latitude/longitude (EXIF GPS, or a CSV with ``lat,lon``, or a CSV
  with ``easting,northing`` plus a ``utm_zone``/``epsg`` column). Easting/northing are WGS84 UTM
  metres in the zone that contains the point (or the zone the CSV gives).
- ``local``: easting/northing in metres of a local frame with no geodetic reference (a CSV with
  ``easting,northing`` and no zone, e.g. motion-capture coordinates). There is no lat/lon.

Mixing the two in one database is refused: distances between them mean nothing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placerank.data.geo import project_latlon, unproject, utm_zone_for
from placerank.errors import DataError

__all__ = ["LOCAL", "WGS84", "Position", "parse_zone", "project_latlon", "read_positions_csv", "unproject", "utm_label"]

WGS84 = "wgs84"
LOCAL = "local"


@dataclass(frozen=True)
class Position:
    easting: float
    northing: float
    epsg: int | None = None  # WGS84 UTM EPSG (326zz north / 327zz south); None in a local frame
    lat: float | None = None
    lon: float | None = None

    @property
    def frame(self) -> str:
        return WGS84 if self.epsg is not None else LOCAL

    @classmethod
    def from_latlon(cls, lat: float, lon: float) -> Position:
        epsg = utm_zone_for(lat, lon)
        e, n = project_latlon(np.array([[lat, lon]]), epsg)[0]
        return cls(float(e), float(n), int(epsg), float(lat), float(lon))

    @classmethod
    def from_utm(cls, easting: float, northing: float, epsg: int) -> Position:
        lat, lon = unproject(np.array([[easting, northing]]), epsg)[0]
        return cls(float(easting), float(northing), int(epsg), float(lat), float(lon))


def utm_label(epsg: int | None) -> str:
    """'33N' for EPSG 32633, '' for a local frame."""
    if epsg is None:
        return ""
    return f"{epsg % 100}{'N' if epsg < 32700 else 'S'}"


def parse_zone(value: str, where: str) -> int:
    """A UTM zone as written in a CSV -> EPSG. Accepts ``33``/``33N`` (north), ``33S`` (south)
    or an EPSG code ``32633``. (MGRS latitude-band letters are not accepted: 'S' is ambiguous.)"""
    v = value.strip().upper()
    try:
        if v.isdigit() and len(v) == 5:
            epsg = int(v)
            if 32601 <= epsg <= 32660 or 32701 <= epsg <= 32760:
                return epsg
            raise ValueError
        hemi = "N"
        if v and v[-1] in "NS":
            v, hemi = v[:-1], v[-1]
        zone = int(v)
        if not 1 <= zone <= 60:
            raise ValueError
        return (32600 if hemi == "N" else 32700) + zone
    except ValueError:
        raise DataError(f"{where}: '{value}' is not a UTM zone (use e.g. 33, 33N, 33S or EPSG 32633)") from None


def read_positions_csv(csv_path: str | Path) -> dict[Path, Position]:
    """``path,lat,lon`` or ``path,easting,northing`` [+ ``utm_zone`` or ``epsg``] -> {resolved
    image path: Position}. Paths are relative to the CSV's folder (or absolute); a ``file``
    column is accepted instead of ``path``."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: positions CSV does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
            rows = [
                {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                for row in reader
            ]
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: not a readable CSV ({e})") from None
    path_col = "path" if "path" in columns else ("file" if "file" in columns else None)
    if path_col is None:
        raise DataError(f"{csv_path}: positions CSV needs a 'path' column (found: {', '.join(columns) or 'none'})")
    has_ll = "lat" in columns and "lon" in columns
    has_en = "easting" in columns and "northing" in columns
    if not has_ll and not has_en:
        raise DataError(f"{csv_path}: positions CSV needs lat,lon or easting,northing columns")
    if not rows:
        raise DataError(f"{csv_path}: positions CSV lists no images")
    zone_col = "utm_zone" if "utm_zone" in columns else ("epsg" if "epsg" in columns else None)
    base = csv_path.parent
    out: dict[Path, Position] = {}
    first_row: dict[Path, int] = {}
    for i, r in enumerate(rows, start=2):
        where = f"{csv_path}:{i}"
        if not r.get(path_col):
            raise DataError(f"{where}: empty '{path_col}'")
        p = Path(r[path_col])
        p = (p if p.is_absolute() else base / p).resolve()
        if p in first_row:
            raise DataError(
                f"{where}: {p.name} is listed again (first at row {first_row[p]}); remove the duplicate row"
            )
        first_row[p] = i
        try:
            if has_ll:  # lat/lon wins when both are present: it carries the geodetic reference
                lat, lon = float(r["lat"]), float(r["lon"])
                if not (np.isfinite(lat) and np.isfinite(lon)):
                    raise ValueError(f"not finite: {lat}, {lon}")
                if not (abs(lat) <= 90 and abs(lon) <= 180):
                    raise DataError(f"{where}: lat/lon out of range ({lat}, {lon})")
                pos = Position.from_latlon(lat, lon)
            else:
                east, north = float(r["easting"]), float(r["northing"])
                if not (np.isfinite(east) and np.isfinite(north)):
                    raise ValueError(f"not finite: {east}, {north}")
                zone = r.get(zone_col, "") if zone_col else ""
                pos = Position.from_utm(east, north, parse_zone(zone, where)) if zone else Position(east, north)
        except ValueError as e:
            cols = "lat,lon" if has_ll else "easting,northing"
            raise DataError(f"{where}: a value in {cols} is not a number ({e})") from None
        out[p] = pos
    return out
