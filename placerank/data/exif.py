"""GPS position of a photo from its EXIF block, read with ``exifread`` (no hand-written parser).

Three outcomes, so ``placerank index`` can tell the user exactly what happened per file:

- :class:`GpsReading` with ``lat``/``lon`` (WGS84 degrees) when the photo carries a usable fix;
- ``NoGps`` (a reason string) when there is no EXIF, no GPS block, a GPS status "void", or the
  0/0 placeholder some cameras write without a fix;
- :class:`~placerank.errors.DataError` when the EXIF/GPS block exists but is damaged (exifread
  in strict mode rejects it, the GPS pointer leads to no coordinates, values are out of range).

The file is opened read-only and only its metadata is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from struct import error as struct_error

import exifread

from placerank.errors import DataError


@dataclass(frozen=True)
class GpsReading:
    lat: float
    lon: float
    altitude: float | None = None


@dataclass(frozen=True)
class NoGps:
    reason: str


def _ratio(v) -> float:
    """An exifread Ratio (or int) as float; a zero denominator is damage, not zero."""
    num = getattr(v, "num", None)
    den = getattr(v, "den", None)
    if num is None or den is None:
        return float(v)
    if den == 0:
        raise ZeroDivisionError("rational with zero denominator")
    return float(Fraction(int(num), int(den)))


def _dms(tag) -> float:
    vals = list(tag.values)
    if len(vals) != 3:
        raise ValueError(f"expected degrees, minutes, seconds, got {len(vals)} value(s)")
    d, m, s = (_ratio(v) for v in vals)
    if not (0 <= m < 60 and 0 <= s < 60.5):
        raise ValueError(f"minutes/seconds out of range ({m}, {s})")
    return d + m / 60.0 + s / 3600.0


def _exif_header_is_damaged(f) -> bool:
    """True when the file announces an EXIF/TIFF block whose byte-order mark is invalid
    (exifread then silently returns no tags)."""
    try:
        from exifread.core.exceptions import ExifNotFound, InvalidExif
        from exifread.core.find_exif import determine_type
    except ImportError:  # pragma: no cover - older exifread layouts
        return False
    try:
        f.seek(0)
        _, endian, _ = determine_type(f)
    except (ExifNotFound, InvalidExif, ValueError, IndexError, OSError):
        return False
    return endian not in (b"I", b"M")


def read_gps(path: str | Path) -> GpsReading | NoGps:
    """GPS of one photo (see module docstring for the three outcomes)."""
    path = Path(path)
    log = logging.getLogger("exifread")
    level = log.level
    log.setLevel(logging.ERROR)  # exifread warns "File format not recognized" for PNGs etc.
    try:
        with open(path, "rb") as f:
            strict_error = None
            try:
                tags = exifread.process_file(f, details=False, strict=True, extract_thumbnail=False)
            except _EXIFREAD_ERRORS as e:
                strict_error = f"{type(e).__name__}: {e}"
                # Real cameras write odd tags in unrelated IFDs; a lenient re-read still gives the
                # GPS block when that is intact, and only then is the photo used.
                try:
                    tags = exifread.process_file(f, details=False, strict=False, extract_thumbnail=False)
                except _EXIFREAD_ERRORS:
                    tags = {}
            if not tags and _exif_header_is_damaged(f):
                raise DataError(f"{path}: EXIF block is damaged (invalid TIFF byte-order mark)")
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    finally:
        log.setLevel(level)
    if strict_error is None:
        return _gps_from_tags(path, tags)
    try:
        reading = _gps_from_tags(path, tags)
    except DataError:
        reading = None
    if isinstance(reading, GpsReading):
        return reading
    raise DataError(f"{path}: EXIF block is damaged ({strict_error})")


_EXIFREAD_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    ZeroDivisionError,
    AttributeError,
    UnicodeDecodeError,
    struct_error,
)


def _gps_from_tags(path: Path, tags: dict) -> GpsReading | NoGps:
    if not tags:
        return NoGps("no EXIF metadata")
    lat_t, lon_t = tags.get("GPS GPSLatitude"), tags.get("GPS GPSLongitude")
    lat_ref, lon_ref = tags.get("GPS GPSLatitudeRef"), tags.get("GPS GPSLongitudeRef")
    has_pointer = "Image GPSInfo" in tags
    if lat_t is None and lon_t is None:
        if has_pointer and any(k.startswith("GPS ") for k in tags):
            raise DataError(f"{path}: EXIF GPS block is damaged (it has no latitude/longitude)")
        if has_pointer and not any(k.startswith("GPS ") for k in tags):
            raise DataError(f"{path}: EXIF GPS block is damaged (the GPS pointer leads to no tags)")
        return NoGps("no GPS in EXIF")
    if lat_t is None or lon_t is None:
        missing = "latitude" if lat_t is None else "longitude"
        raise DataError(f"{path}: EXIF GPS block is damaged ({missing} is missing)")
    status = str(tags.get("GPS GPSStatus", "")).strip().upper()
    if status == "V":
        return NoGps("EXIF GPS status is 'void' (no fix)")
    try:
        lat, lon = _dms(lat_t), _dms(lon_t)
    except (ValueError, ZeroDivisionError, TypeError) as e:
        raise DataError(f"{path}: EXIF GPS coordinates are damaged ({e})") from None
    lat_r = str(lat_ref.values if lat_ref is not None else "N").strip().upper() or "N"
    lon_r = str(lon_ref.values if lon_ref is not None else "E").strip().upper() or "E"
    if lat_r not in ("N", "S") or lon_r not in ("E", "W"):
        raise DataError(f"{path}: EXIF GPS reference is damaged (latitude ref '{lat_r}', longitude ref '{lon_r}')")
    lat = -lat if lat_r == "S" else lat
    lon = -lon if lon_r == "W" else lon
    if abs(lat) > 90 or abs(lon) > 180:
        raise DataError(f"{path}: EXIF GPS coordinates are out of range ({lat:.6f}, {lon:.6f})")
    if lat == 0.0 and lon == 0.0:
        return NoGps("EXIF GPS is 0,0 (a placeholder written without a fix)")
    alt = None
    alt_t = tags.get("GPS GPSAltitude")
    if alt_t is not None:
        try:
            alt = _ratio(alt_t.values[0])
            ref = tags.get("GPS GPSAltitudeRef")
            if ref is not None and list(ref.values)[:1] == [1]:
                alt = -alt
        except (ValueError, ZeroDivisionError, TypeError, IndexError):
            alt = None  # altitude is informational only; never fail a photo on it
    return GpsReading(lat=lat, lon=lon, altitude=alt)
