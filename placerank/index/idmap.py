"""Id-mapped, generation-stamped FAISS index: the derived search index of a store whose rows
(and their descriptors) live elsewhere, e.g. the localize database's SQLite file.

On disk, in the owner's folder::

    index.g<N>.faiss   FAISS IndexIDMap2(<index of kind spec>) holding the owner's row ids, generation N
    index.json         {format, kind, dimension, model, weights_id, count, generation, spec, options}

``spec`` is any index kind of :mod:`placerank.index.spec` ("flat" by default and in folders from
before index kinds). A kind that needs training (IVF, PQ) is trained on a random sample of the
owner's descriptors when the index is (re)built; one that cannot remove rows (HNSW) makes
:meth:`IdMapIndex.remove` return False, and the owner rebuilds from its stored descriptors.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.index import spec as S
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
    spec: str = "flat"
    options: dict = field(default_factory=dict)  # search options as strings, e.g. {"nprobe": "32"}


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

    def __init__(
        self,
        dimension: int,
        model: str = "",
        weights_id: str = "",
        generation: int = 0,
        spec: str = "flat",
        options: dict | None = None,
        inner: faiss.Index | None = None,
    ):
        """``inner``: an empty, trained index of kind ``spec`` (made from ``spec`` if None)."""
        self.schema = IdMapSchema(int(dimension), model, weights_id, 0, int(generation), spec=spec)
        self.index: Any = faiss.IndexIDMap2(inner if inner is not None else S.make_index(int(dimension), spec))
        self.set_options(options)

    def set_options(self, options: dict | None) -> None:
        """Search options (see :func:`placerank.index.spec.apply_options`) on the wrapped index."""
        inner = faiss.downcast_index(self.index.index)
        opts = S.with_defaults(inner, S.normalize_options(options))
        S.apply_options(inner, opts, self.schema.spec)
        self.schema.options = opts

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

    def remove(self, ids: np.ndarray | list[int]) -> bool:
        """Drop ``ids``; False when the index kind cannot remove rows (HNSW): rebuild it instead."""
        if len(ids):
            try:
                self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            except RuntimeError:
                return False
        self.schema.count = len(self)
        return True

    def ids(self) -> np.ndarray:
        """The stored ids, sorted."""
        return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, ids), each (Q, k), best first; k is capped at the index size."""
        if len(self) == 0:
            raise PlaceRankError("the index is empty: add descriptors before searching")
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.schema.dimension)
        k = min(int(k), len(self))
        with S.at_least_k(self.index, k):
            return self.index.search(q, k)

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
        if schema is None or replace(schema, options={}) != replace(expected, options={}):
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
        try:
            obj.set_options(expected.options)
        except PlaceRankError:
            return None
        return obj

    @classmethod
    def build(
        cls,
        dimension: int,
        chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | Iterable[tuple[np.ndarray, np.ndarray]],
        model: str = "",
        weights_id: str = "",
        generation: int = 0,
        spec: str = "flat",
        options: dict | None = None,
        count: int | None = None,
    ) -> IdMapIndex:
        """A new index from ``(ids, vectors)`` chunks. A kind that needs training takes ``chunks``
        as a callable (read twice: the training sample of ``count`` rows, then every row)."""
        inner = S.make_index(int(dimension), spec)
        if S.needs_training(inner):
            if not callable(chunks) or count is None:
                raise ValueError("an index kind that needs training reads its chunks twice: pass a callable and count")
            _train(inner, spec, chunks, int(count))
        obj = cls(dimension, model, weights_id, generation, spec, options, inner=inner)
        for ids, vectors in chunks() if callable(chunks) else chunks:
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
        return cls.build(e.dimension, chunks, e.model, e.weights_id, e.generation, e.spec, e.options, len(ids)), True


def _train(
    inner: faiss.Index, spec: str, chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n: int
) -> None:
    """Train ``inner`` on the documented random sample (:func:`placerank.index.spec.train_rows`) of
    the ``n`` rows ``chunks()`` yields, gathered in one pass."""
    rows = S.train_rows(n, S.check_train_size(spec, inner, n, None))
    parts, start = [], 0
    for _, vectors in chunks():
        v = np.asarray(vectors, dtype=np.float32)
        lo, hi = np.searchsorted(rows, [start, start + len(v)])
        parts.append(v[rows[lo:hi] - start])
        start += len(v)
    try:
        inner.train(np.ascontiguousarray(np.concatenate(parts)))
    except (RuntimeError, ValueError) as e:
        raise PlaceRankError(f"index '{spec}' could not be trained: {S.faiss_message(e)}") from None


def usable_spec(spec: str, dimension: int, count: int) -> str:
    """``spec``, or "flat" while the owner has fewer rows than ``spec`` needs to train (an owner
    that grows from empty is searched exactly until then, and retrained once it has enough)."""
    inner = S.make_index(int(dimension), spec)
    if S.needs_training(inner) and count < max(S.kmeans_sizes(inner) or [1]):
        return "flat"
    return spec
