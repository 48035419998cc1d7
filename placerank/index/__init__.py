"""Database descriptor indexes (FAISS) with validated on-disk schemas."""

from placerank.index.flat import FlatIndex, IndexSchema  # noqa: F401
