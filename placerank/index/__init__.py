"""Database descriptor indexes (FAISS) with validated on-disk schemas: any index kind by FAISS
index-factory string (``factory.py``: ``build_index``, ``VPRIndex``, ``merge_indexes``), the flat
index it grew from, the id-mapped generation-stamped index of a localize database, and the
candidates file ``placerank search`` writes."""

from placerank.index.factory import VPRIndex, build_index, merge_indexes  # noqa: F401
from placerank.index.flat import FlatIndex, IndexSchema  # noqa: F401
from placerank.index.idmap import IdMapIndex  # noqa: F401
