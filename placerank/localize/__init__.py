"""Localize your own photos: index a folder of geotagged photos once, then estimate where new
photos were taken (lat/lon or metres, a confidence, the top matches, pictures).

    import placerank
    db = placerank.Database.open_or_create("my.db")          # EfficientNet-Lite0 + GeM by default
    db.add_folder("photos/")                                  # EXIF GPS; only new/changed photos
    result = db.localize("new_photo.jpg", rerank="ransac-xfeat")
    print(result.lat, result.lon, result.confidence)

See :mod:`placerank.localize.database` (the facade and the folder layout),
:mod:`placerank.localize.estimate` (position and confidence) and docs/localize.md.
"""

from placerank.data.exif import GpsReading, NoGps, read_gps  # noqa: F401
from placerank.data.positions import Position, read_positions_csv  # noqa: F401
from placerank.localize.database import Database  # noqa: F401
from placerank.localize.estimate import Estimate, EstimateConfig, estimate_position  # noqa: F401
from placerank.localize.lock import DatabaseBusyError, WriteLock  # noqa: F401
from placerank.localize.outputs import write_outputs  # noqa: F401
from placerank.localize.results import (  # noqa: F401
    IndexReport,
    LocalizeResult,
    Match,
    QueryGps,
    RemoveReport,
)
