"""Id-mapped, generation-stamped FAISS index: the derived search index of a store whose rows
(and their descriptors) live elsewhere, e.g. the localize database's SQLite file.

On disk, in the owner's folder::

    index.g<N>.faiss   FAISS IndexIDMap2(IndexFlatIP) holding the owner's row ids, generation N
    index.json         {format, kind, dimension, model, weights_id, count, generation}

The owner bumps its generation with every change; the index file carries the generation in its
name and ``index.json`` names the file that is current. Both are written to a temporary file and
renamed (index first, schema last), and older generations are deleted afterwards. Removing rows
is ``remove_ids``, not a rebuild.

:meth:`IdMapIndex.open` returns the saved index only when its schema, its file and its ids all
agree with what the owner expects; otherwise (a crash between the owner's commit and the index
write, a deleted, damaged or foreign file, a folder from before ``index.json`` existed) it is
rebuilt from the owner's stored descriptors, so the two can never disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.utils import atomic_path, write_json_atomic

FORMAT = 1
KIND = "idmap-flat-ip"
SCHEMA_FILE = "index.json"


@dataclass
class IdMapSchema:
    dimension: int
    model: str
    weights_id: str
    count: int
    generation: int
    kind: str = KIND
    format: int = FORMAT


def index_file(folder: str | Path, generation: int) -> Path:
    return Path(folder) / f"index.g{int(generation)}.faiss"


def read_schema(folder: str | Path) -> IdMapSchema | None:
    """The schema saved in ``folder``, or None when it is missing or unreadable."""
    path = Path(folder) / SCHEMA_FILE
    try:
        schema = IdMapSchema(**json.loads(path.read_text()))
    except (OSError, TypeError, ValueError):
        return None
    return schema


class IdMapIndex:
    """Inner-product index over caller-chosen int64 ids (cosine similarity for L2-normalised rows)."""

    def __init__(self, dimension: int, model: str = "", weights_id: str = "", generation: int = 0):
        self.schema = IdMapSchema(int(dimension), model, weights_id, 0, int(generation))
        self.index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(int(dimension)))

    @property
    def generation(self) -> int:
        return self.schema.generation

    @generation.setter
    def generation(self, value: int) -> None:
        self.schema.generation = int(value)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.schema.dimension:
            raise IndexMismatchError(f"descriptors are {v.shape[-1]}-d but the index is {self.schema.dimension}-d")
        i = np.ascontiguousarray(ids, dtype=np.int64)
        if len(i) != len(v):
            raise ValueError(f"{len(i)} ids for {len(v)} descriptors")
        self.index.add_with_ids(v, i)
        self.schema.count = len(self)

    def remove(self, ids: np.ndarray | list[int]) -> None:
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self.schema.count = len(self)

    def ids(self) -> np.ndarray:
        """The stored ids, sorted."""
        return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, ids), each (Q, k), best first; k is capped at the index size."""
        if len(self) == 0:
            raise PlaceRankError("the index is empty: add descriptors before searching")
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.schema.dimension)
        return self.index.search(q, min(int(k), len(self)))

    def save(self, folder: str | Path) -> Path:
        """Write ``index.g<generation>.faiss`` then ``index.json``; delete other generations."""
        folder = Path(folder)
        target = index_file(folder, self.generation)
        with atomic_path(target) as tmp:
            faiss.write_index(self.index, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        write_json_atomic(folder / SCHEMA_FILE, asdict(self.schema))
        for old in folder.glob("index.g*.faiss"):
            if old != target:
                with contextlib.suppress(OSError):
                    old.unlink()
        return target

    @classmethod
    def load(cls, folder: str | Path, expected: IdMapSchema, ids: np.ndarray) -> IdMapIndex | None:
        """The saved index when its schema equals ``expected`` (count included) and it holds
        exactly ``ids``; None when it is missing, stale, damaged or built for something else."""
        schema = read_schema(folder)
        if schema != expected:
            return None
        try:
            index: Any = faiss.read_index(str(index_file(folder, expected.generation)))
            stored = np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
        except (RuntimeError, AttributeError):
            return None  # missing, damaged or not an id-mapped index
        if index.d != expected.dimension or index.ntotal != expected.count:
            return None
        if not np.array_equal(stored, np.sort(np.asarray(ids, dtype=np.int64))):
            return None
        obj = cls.__new__(cls)
        obj.schema, obj.index = schema, index
        return obj

    @classmethod
    def build(
        cls,
        dimension: int,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        model: str = "",
        weights_id: str = "",
        generation: int = 0,
    ) -> IdMapIndex:
        """A new index from ``(ids, vectors)`` chunks."""
        obj = cls(dimension, model, weights_id, generation)
        for ids, vectors in chunks:
            obj.add(ids, vectors)
        return obj

    @classmethod
    def open(
        cls,
        folder: str | Path,
        expected: IdMapSchema,
        ids: np.ndarray,
        chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    ) -> tuple[IdMapIndex, bool]:
        """(index, rebuilt): the saved index if it is in sync with ``expected`` and ``ids``, else
        one rebuilt from ``chunks()`` (the owner's stored descriptors; not saved here)."""
        index = cls.load(folder, expected, ids)
        if index is not None:
            return index, False
        e = expected
        return cls.build(e.dimension, chunks(), e.model, e.weights_id, e.generation), True
