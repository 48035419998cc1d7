"""WGS84 <-> UTM with pyproj (never hand-rolled formulas)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def utm_zone_for(lat: float, lon: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lat, lon), e.g. 32633 for zone 33N."""
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    # Norway / Svalbard exceptions, as in the UTM standard.
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    if 72.0 <= lat < 84.0 and lon >= 0.0:
        if lon < 9.0:
            zone = 31
        elif lon < 21.0:
            zone = 33
        elif lon < 33.0:
            zone = 35
        elif lon < 42.0:
            zone = 37
    return (32600 if lat >= 0 else 32700) + zone


@lru_cache(maxsize=64)
def _transformer(epsg: int, inverse: bool = False):
    """The one cached pyproj transformer: WGS84 lon/lat -> UTM ``epsg`` (or back)."""
    from pyproj import Transformer

    if inverse:
        return Transformer.from_crs(epsg, 4326, always_xy=True)
    return Transformer.from_crs(4326, epsg, always_xy=True)


def project_latlon(latlon: np.ndarray, epsg: int) -> np.ndarray:
    """(N,2) lat/lon degrees -> (N,2) easting/northing metres in the given UTM zone (e.g. to put
    points of neighbouring zones into one zone)."""
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    e, n = _transformer(int(epsg)).transform(latlon[:, 1], latlon[:, 0])
    return np.stack([np.asarray(e), np.asarray(n)], axis=1)


def unproject(en: np.ndarray, epsg: int) -> np.ndarray:
    """(N,2) easting/northing metres in UTM ``epsg`` -> (N,2) lat/lon degrees."""
    en = np.asarray(en, dtype=np.float64).reshape(-1, 2)
    lon, lat = _transformer(int(epsg), inverse=True).transform(en[:, 0], en[:, 1])
    return np.stack([np.asarray(lat), np.asarray(lon)], axis=1)


def latlon_to_utm(latlon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N,2)`` lat/lon degrees -> (``(N,2)`` easting/northing metres, ``(N,)`` EPSG zone codes),
    each point in the zone that contains it."""
    latlon = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    zones = np.array([utm_zone_for(la, lo) for la, lo in latlon], dtype=np.int64)
    en = np.zeros_like(latlon)
    for z in np.unique(zones):
        m = zones == z
        en[m] = project_latlon(latlon[m], int(z))
    return en, zones


def utm_to_latlon(easting_northing: np.ndarray, zones: np.ndarray) -> np.ndarray:
    en = np.asarray(easting_northing, dtype=np.float64).reshape(-1, 2)
    zones = np.asarray(zones).reshape(-1)
    out = np.zeros_like(en)
    for z in np.unique(zones):
        m = zones == z
        out[m] = unproject(en[m], int(z))
    return out
