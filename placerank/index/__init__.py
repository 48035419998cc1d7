"""Database descriptor indexes (FAISS) with validated on-disk schemas: the flat index eval
searches, the id-mapped generation-stamped index of a localize database, and the candidates file
``placerank search`` writes."""

from placerank.index.flat import FlatIndex, IndexSchema  # noqa: F401
from placerank.index.idmap import IdMapIndex  # noqa: F401
