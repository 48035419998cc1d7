"""Database indexes of any kind, by FAISS index-factory string: the one entry point every caller uses.

``build_index(descriptors, spec)`` trains (on a documented random sample, see
:mod:`placerank.index.spec`) and fills a :class:`VPRIndex`; descriptors may be a read-only
``np.memmap`` and are read a chunk at a time, never copied whole. ``VPRIndex.search`` answers
top-k by inner product a chunk of queries at a time, on a GPU copy when faiss has GPU support and a
CUDA device is given (:func:`~placerank.index.flat.gpu_copy`; flat and IVF kinds). Saved as::

    DIR/index.faiss     the FAISS index (for on-disk IVF: its header; the lists are in DIR/<name>.ivfdata)
    DIR/index.json      {format, kind, spec, options, train_size, dimension, model, weights_id, count,
                         build_s, trained_sha, ivfdata}

Loading checks index.json against the model in use and the spec asked for; a mismatch is one
:class:`IndexMismatchError` line. A format-1 ``FlatIndex`` folder loads as spec ``flat``.
See docs/index.md for which kind suits which database size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.index import spec as S
from placerank.index.flat import check_made_by, gpu_copy
from placerank.utils import atomic_path, write_json_atomic

FORMAT = 2
KIND = "placerank-index"
#: database rows added to FAISS per call (and per on-disk block)
ADD_CHUNK = 65536
#: faiss-gpu answers k <= 2048 (and nprobe <= 2048); beyond that the CPU index answers
GPU_MAX_K = 2048


@dataclass
class FactorySchema:
    """What ``index.json`` holds."""

    dimension: int
    model: str
    weights_id: str
    count: int
    spec: str = "flat"
    options: dict = field(default_factory=dict)
    train_size: int = 0
    build_s: float = 0.0
    trained_sha: str = ""  # hash of the trained, empty index: parts with equal hashes can merge
    ivfdata: str = ""  # file name of the on-disk inverted lists, "" when held in RAM
    kind: str = KIND
    format: int = FORMAT


def _rows(descriptors, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(descriptors[start:stop], dtype=np.float32)


def _check_shape(descriptors, dimension: int | None = None) -> tuple[int, int]:
    shape: tuple = tuple(getattr(descriptors, "shape", ()))
    if len(shape) != 2:
        raise PlaceRankError(f"descriptors must be an (N, D) array, got shape {tuple(shape)}")
    if dimension is not None and shape[1] != dimension:
        raise IndexMismatchError(f"descriptors are {shape[1]}-d but the index is {dimension}-d")
    return int(shape[0]), int(shape[1])


def trained_hash(index: faiss.Index) -> str:
    """Hash of an empty trained index (its centroids / codebooks): equal for equally trained parts.
    Streamed through a FAISS callback writer: no serialised copy is held."""
    h = hashlib.sha256()
    writer = faiss.PyCallbackIOWriter(h.update)  # type: ignore[attr-defined]
    faiss.write_index(index, writer)
    del writer  # flushes
    return h.hexdigest()[:16]


class VPRIndex:
    """A FAISS index of database descriptors: top-k by inner product, any index kind."""

    def __init__(self, index: faiss.Index, schema: FactorySchema, folder: str | Path | None = None):
        self.index = index
        self.schema = schema
        self.folder = Path(folder) if folder is not None else None  # where the on-disk lists live
        self.searched_on = "cpu"  # where the last search ran: "cpu" or "gpu" (faiss-gpu)
        self._gpu: dict[str, faiss.Index | None] = {}
        self._bytes: int | None = None
        self._parts: list[VPRIndex] = []  # shards kept alive by an IndexShards merge
        self._scratch: tempfile.TemporaryDirectory | None = None  # on-disk lists of ``on_disk=1``, removed with us
        #: the database descriptors (array or read-only memmap, never copied) for ``rescore=K``
        self.descriptors = None

    @property
    def spec(self) -> str:
        return self.schema.spec

    @property
    def options(self) -> dict[str, str]:
        return dict(self.schema.options)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def _changed(self) -> None:
        self.schema.count = len(self)
        self._gpu.clear()
        self._bytes = None

    def add(self, descriptors, chunk: int = ADD_CHUNK, progress: bool = False) -> None:
        """Add rows (ids continue from ``len(self)``), ``chunk`` rows at a time."""
        if self.schema.ivfdata:
            raise PlaceRankError("an index with on-disk inverted lists is read-only: rebuild it to add images")
        n, _ = _check_shape(descriptors, self.schema.dimension)
        bar = tqdm(total=n, desc=f"index ({self.spec})", unit="img", leave=False, disable=not progress)
        for s in range(0, n, chunk):
            self.index.add(_rows(descriptors, s, s + chunk))
            bar.update(min(chunk, n - s))
        bar.close()
        self._changed()

    def set_options(self, options: dict | None) -> None:
        """Apply search options (``{"nprobe": "32"}``) on top of the stored ones; see spec.apply_options."""
        opts = {**self.schema.options, **S.normalize_options(options)}
        rescore = S.rescore_of(opts, self.spec)  # ours, not FAISS's
        opts.pop("rescore", None)
        opts = S.with_defaults(self.index, opts)
        S.apply_options(self.index, opts, self.spec)
        self.schema.options = {**opts, "rescore": str(rescore)} if rescore else opts
        self._gpu.clear()

    def _searcher(self, k: int, device) -> faiss.Index:
        if k > GPU_MAX_K or self.schema.ivfdata or self._parts or device is None:
            return self.index
        key = str(device)
        if key not in self._gpu:
            gpu = gpu_copy(self.index, device)
            if gpu is not None and self.schema.options and hasattr(faiss, "GpuParameterSpace"):
                try:
                    for name, value in self.schema.options.items():
                        faiss.GpuParameterSpace().set_index_parameter(gpu, name, float(value))
                except RuntimeError:
                    gpu = None  # an option the GPU index lacks: stay on the CPU, same results
            self._gpu[key] = gpu
        return self._gpu[key] or self.index

    def search(self, queries, k: int, chunk: int = 1024, device=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities float32, ids int64), each (Q, k), best first; k is capped at the index
        size. Holds ``chunk`` queries at a time (``queries`` may be a memmap). Approximate kinds may
        find fewer than k rows for a query: those slots have id -1 and similarity -inf. With the
        option ``rescore=K`` it finds max(K, k) candidates and returns the top k of them by exact
        inner product with :attr:`descriptors` (:mod:`placerank.index.rescore`)."""
        if len(self) == 0:
            raise PlaceRankError("the database index is empty: add images before searching")
        rescore = int(self.schema.options.get("rescore", "0"))
        if rescore:
            if self.descriptors is None:
                raise PlaceRankError(
                    f"index '{self.spec}' has rescore={rescore} but no database descriptors to re-score with: "
                    "set VPRIndex.descriptors (eval and search do) or drop the option"
                )
            from placerank.index.rescore import rescore as exact

            k = min(int(k), len(self))
            sims, ids = self._search(queries, max(rescore, k), chunk, device)
            q = np.asarray(queries)  # a memmap stays a memmap: read in blocks by ``exact``
            return exact(self.descriptors, q, ids, k)
        return self._search(queries, k, chunk, device)

    def _search(self, queries, k: int, chunk: int, device) -> tuple[np.ndarray, np.ndarray]:
        nq, _ = _check_shape(queries, self.schema.dimension)
        k = min(int(k), len(self))
        sims = np.empty((nq, k), dtype=np.float32)
        ids = np.empty((nq, k), dtype=np.int64)
        index = self._searcher(k, device)
        self.searched_on = "gpu" if index is not self.index else "cpu"
        l2 = index.metric_type == faiss.METRIC_L2  # some kinds (HNSW-PQ) only do L2: 1 - d/2 on unit vectors
        with S.at_least_k(index, k):
            for s in range(0, nq, chunk):
                d, i = index.search(_rows(queries, s, s + chunk), k)
                sims[s : s + chunk] = 1.0 - d / 2.0 if l2 else d
                ids[s : s + chunk] = i
        sims[ids < 0] = -np.inf
        return sims, ids

    @property
    def nbytes(self) -> int:
        """Bytes the index takes serialised (what it costs in RAM, or on disk for on-disk lists)."""
        if self._bytes is None:
            if self._parts:
                self._bytes = sum(p.nbytes for p in self._parts)
            else:
                count = [0]

                def counter(buf: bytes) -> None:
                    count[0] += len(buf)

                writer = faiss.PyCallbackIOWriter(counter)  # type: ignore[attr-defined]
                faiss.write_index(self.index, writer)
                del writer  # flushes
                extra = os.path.getsize(self.folder / self.schema.ivfdata) if self.schema.ivfdata and self.folder else 0
                self._bytes = count[0] + extra
        return self._bytes

    def describe(self) -> dict:
        """{"spec", "options", "train_size", "bytes", "bytes_per_image", "build_s", "on_disk"} for
        results and logs."""
        n = max(len(self), 1)
        return {
            "spec": self.spec,
            "options": self.options,
            "train_size": int(self.schema.train_size),
            "bytes": int(self.nbytes),
            "bytes_per_image": round(self.nbytes / n, 2),
            "build_s": round(float(self.schema.build_s), 3),
            "on_disk": bool(self.schema.ivfdata),
        }

    def save(self, folder: str | Path) -> None:
        """Write ``index.faiss`` (and the on-disk lists, if they live elsewhere) then ``index.json``."""
        if self._parts:
            raise PlaceRankError(
                "an index merged from separately trained parts is searchable but cannot be saved: "
                "build one index over all descriptors instead"
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.schema.ivfdata and self.folder is not None and self.folder.resolve() != folder.resolve():
            import shutil

            with atomic_path(folder / self.schema.ivfdata) as tmp:
                shutil.copyfile(self.folder / self.schema.ivfdata, tmp)
        with atomic_path(folder / "index.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        write_json_atomic(folder / "index.json", asdict(self.schema))
        for old in folder.glob("*.ivfdata"):
            if old.name != self.schema.ivfdata:
                old.unlink(missing_ok=True)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        model: str | None = None,
        weights_id: str | None = None,
        dimension: int | None = None,
        spec: str | None = None,
        options: dict | None = None,
    ) -> VPRIndex:
        """A saved index, checked against what the caller expects (None = anything); ``options``
        override the stored search options."""
        folder = Path(folder)
        schema = read_schema(folder)
        check_made_by(folder, schema, model, weights_id, dimension)
        if spec is not None and schema.spec != spec.strip():
            raise IndexMismatchError(
                f"{folder}: index was built as '{schema.spec}', not '{spec}': rebuild it with --index {spec} "
                f"or use --index {schema.spec}"
            )
        flags = 0
        if schema.ivfdata:
            if not (folder / schema.ivfdata).is_file():
                raise PlaceRankError(f"{folder}: the on-disk inverted lists {schema.ivfdata} are missing")
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        try:
            index = faiss.read_index(str(folder / "index.faiss"), flags)
        except RuntimeError as e:
            raise PlaceRankError(f"{folder}: index.faiss is unreadable ({S.faiss_message(e)})") from None
        if index.ntotal != schema.count or index.d != schema.dimension:
            raise IndexMismatchError(f"{folder}: index.faiss ({index.ntotal} x {index.d}) does not match index.json")
        obj = cls(index, schema, folder)
        obj.set_options(options)
        return obj


def read_schema(folder: str | Path) -> FactorySchema:
    """``index.json`` of ``folder`` (a format-1 flat index reads as spec ``flat``); one-line errors."""
    folder = Path(folder)
    meta_path = folder / "index.json"
    if not meta_path.is_file() or not (folder / "index.faiss").is_file():
        raise PlaceRankError(f"{folder}: not a placerank index (index.json / index.faiss missing)")
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == 1 and meta.get("kind") == "flat-ip":  # a FlatIndex folder
            meta = {**meta, "format": FORMAT, "kind": KIND, "spec": "flat"}
        schema = FactorySchema(**meta)
    except (TypeError, ValueError, AttributeError) as e:
        raise PlaceRankError(f"{meta_path}: unreadable index schema ({e})") from None
    if schema.format != FORMAT or schema.kind != KIND:
        raise IndexMismatchError(
            f"{folder}: index format {schema.format} ({schema.kind}) is not supported (expected {FORMAT})"
        )
    return schema


def build_index(
    descriptors,
    spec: str = "flat",
    options: dict | None = None,
    train_size: int | None = None,
    model: str = "",
    weights_id: str = "",
    progress: bool = False,
    device=None,
    on_disk: str | Path | None = None,
) -> VPRIndex:
    """Train (if the kind needs it) and fill an index of ``spec`` with ``descriptors`` (N, D) float32,
    L2-normalised; a memmap is read in chunks. ``on_disk`` = a folder: IVF lists go to a file there
    (see :mod:`placerank.index.ondisk`); save the index into the same folder. The option
    ``on_disk=1`` (``--index-option on_disk=1``) does the same in a scratch folder under $TMPDIR
    that lives as long as the index. ``device`` is only used for searching (see :meth:`VPRIndex.search`)."""
    start = time.perf_counter()
    n, dim = _check_shape(descriptors)
    spec = str(spec).strip()
    index = S.make_index(dim, spec)
    options = S.normalize_options(options)
    scratch = None
    if float(options.pop("on_disk", "0")) and on_disk is None:
        scratch = tempfile.TemporaryDirectory(prefix="placerank-ivf-")
        on_disk = scratch.name
    if on_disk is not None and S.nlist_of(index) == 0:
        raise PlaceRankError(f"on-disk inverted lists need an IVF index (e.g. IVF4096,PQ64), not '{spec}'")
    size = S.check_train_size(spec, index, n, train_size)
    if size:
        sample = np.ascontiguousarray(descriptors[S.train_rows(n, size)], dtype=np.float32)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise PlaceRankError(
                f"index '{spec}' could not be trained on {size} descriptors: {S.faiss_message(e)}"
            ) from None
        del sample
    schema = FactorySchema(dim, model, weights_id, 0, spec=spec, train_size=size, trained_sha=trained_hash(index))
    obj = VPRIndex(index, schema)
    obj.set_options(options)
    obj.descriptors = descriptors
    if on_disk is not None:
        from placerank.index.ondisk import fill_on_disk

        schema.ivfdata = fill_on_disk(index, descriptors, on_disk, spec, ADD_CHUNK, progress)
        obj.folder = Path(on_disk)
        obj.set_options(options)  # the lists were replaced; keep nprobe & co.
        obj._changed()
        obj._scratch = scratch
    else:
        obj.add(descriptors, progress=progress)
    schema.build_s = time.perf_counter() - start
    return obj


def merge_indexes(parts: list[VPRIndex]) -> VPRIndex:
    """One index holding ``parts`` in order (ids of part i follow those of parts < i). Equally
    trained parts (same spec and training: flat kinds always) merge into one FAISS index with
    ``merge_from``, which empties the parts; others are searched together as a FAISS
    ``IndexShards`` (searchable, not saveable)."""
    if not parts:
        raise PlaceRankError("no index parts to merge")
    first = parts[0].schema
    for p in parts[1:]:
        s = p.schema
        if (s.spec, s.dimension, s.model, s.weights_id) != (first.spec, first.dimension, first.model, first.weights_id):
            raise IndexMismatchError(
                f"cannot merge an index of {s.spec} {s.dimension}-d {s.model} with one of "
                f"{first.spec} {first.dimension}-d {first.model}"
            )
    schema = FactorySchema(**{**asdict(first), "ivfdata": "", "count": 0})
    schema.train_size = max(p.schema.train_size for p in parts)
    schema.build_s = sum(p.schema.build_s for p in parts)
    same = len({p.schema.trained_sha for p in parts}) == 1 and not any(p.schema.ivfdata for p in parts)
    if same:
        merged = faiss.clone_index(parts[0].index)
        ivf = S.nlist_of(merged) > 0  # IVF lists store ids: shift them; flat codes are in order already
        moved = 0
        try:
            for p in parts[1:]:
                merged.merge_from(p.index, merged.ntotal if ivf else 0)
                p._changed()
                moved += 1
            out = VPRIndex(merged, schema)
            out._changed()
            return out
        except RuntimeError:
            if moved:  # some parts were already moved into ``merged``: cannot fall back
                raise
    shards = faiss.IndexShards(first.dimension)  # FAISS defaults: not threaded, successive ids
    for p in parts:
        shards.add_shard(p.index)
    out = VPRIndex(shards, schema)
    out._parts = list(parts)
    out._changed()
    return out
