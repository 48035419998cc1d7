"""placerank: visual place recognition — global retrieval with FAISS, then local re-ranking."""

from placerank.errors import PlaceRankError  # noqa: F401
from placerank.version import __version__  # noqa: F401


def __getattr__(name):  # lazy: importing placerank must not pull torch for `placerank --help`
    if name == "Database":
        from placerank.localize.database import Database

        return Database
    raise AttributeError(name)
