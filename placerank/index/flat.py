"""FAISS flat inner-product index with a small validated on-disk schema.

``DIR/index.faiss`` + ``DIR/index.json`` = {format, kind, dimension, model, weights_id, count}.
Loading checks the schema against the model in use, so an index built with another model,
other weights or another dimension is refused in one line instead of returning garbage.
Search runs in query chunks: no N_query x N_db matrix is ever materialised. With a CUDA
``device`` and a faiss build that has GPU support (``faiss-gpu``: ``faiss.StandardGpuResources``),
search runs on a GPU copy of the index (:func:`gpu_copy`); otherwise, or when the copy fails, on
the CPU index, with the same results.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.utils import atomic_path, write_json_atomic

FORMAT = 1
_GPU_RESOURCES: dict = {}


def gpu_copy(index: faiss.Index, device) -> faiss.Index | None:
    """A GPU copy of ``index`` on ``device`` (a CUDA ``torch.device`` or ``cuda:N``) when faiss
    was built with GPU support and sees that GPU; None otherwise (search stays on the CPU)."""
    if device is None or getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "index_cpu_to_gpu"):
        return None
    try:
        gpu = getattr(device, "index", None)
        if gpu is None and ":" in str(device):
            gpu = int(str(device).split(":")[1])
        gpu = int(gpu or 0)
        if gpu >= faiss.get_num_gpus():
            return None
        if gpu not in _GPU_RESOURCES:  # one set of GPU resources per GPU, kept for the process
            _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[gpu], gpu, index)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return None


def check_made_by(folder: Path, schema, model: str | None, weights_id: str | None, dimension: int | None) -> None:
    """A saved index's schema against the model in use (None = anything): built with another
    model, other weights or another dimension is one :class:`IndexMismatchError`. Every index
    kind's loader calls this (flat here, :class:`~placerank.index.factory.VPRIndex`)."""
    if model is not None and schema.model != model:
        raise IndexMismatchError(f"{folder}: index was built with model '{schema.model}', not '{model}'")
    if weights_id is not None and schema.weights_id != weights_id:
        raise IndexMismatchError(
            f"{folder}: index was built with other weights ({schema.weights_id}) than the model's ({weights_id})"
        )
    if dimension is not None and schema.dimension != dimension:
        raise IndexMismatchError(
            f"{folder}: index is {schema.dimension}-d but the model gives {dimension}-d descriptors"
        )


@dataclass
class IndexSchema:
    dimension: int
    model: str
    weights_id: str
    count: int
    kind: str = "flat-ip"
    format: int = FORMAT


class FlatIndex:
    def __init__(self, dimension: int, model: str = "", weights_id: str = ""):
        self.schema = IndexSchema(int(dimension), model, weights_id, 0)
        self.index: faiss.Index = faiss.IndexFlatIP(int(dimension))
        self.searched_on = "cpu"  # where the last search ran: "cpu" or "gpu" (faiss-gpu)

    @classmethod
    def build(cls, descriptors: np.ndarray, model: str = "", weights_id: str = "") -> FlatIndex:
        idx = cls(descriptors.shape[1], model, weights_id)
        idx.add(descriptors)
        return idx

    def add(self, descriptors: np.ndarray) -> None:
        d = np.ascontiguousarray(descriptors, dtype=np.float32)
        if d.ndim != 2 or d.shape[1] != self.schema.dimension:
            raise IndexMismatchError(f"descriptors are {d.shape[-1]}-d but the index is {self.schema.dimension}-d")
        self.index.add(d)
        self.schema.count = int(self.index.ntotal)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, chunk: int = 1024, device=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, indices), each (Q, k), best first; k is capped at the index size.
        A CUDA ``device`` searches a GPU copy when faiss has GPU support (see :func:`gpu_copy`)."""
        if len(self) == 0:
            raise PlaceRankError("the database index is empty: add images before searching")
        k = min(int(k), len(self))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sims = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        # faiss-gpu's flat search handles k <= 2048; beyond that the CPU index answers
        index = (gpu_copy(self.index, device) if k <= 2048 else None) or self.index
        self.searched_on = "gpu" if index is not self.index else "cpu"
        for s in range(0, len(q), chunk):
            sims[s : s + chunk], ids[s : s + chunk] = index.search(q[s : s + chunk], k)
        return sims, ids

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "index.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        write_json_atomic(folder / "index.json", asdict(self.schema))

    @classmethod
    def load(
        cls, folder: str | Path, model: str | None = None, weights_id: str | None = None, dimension: int | None = None
    ) -> FlatIndex:
        folder = Path(folder)
        meta_path, data_path = folder / "index.json", folder / "index.faiss"
        if not meta_path.exists() or not data_path.exists():
            raise PlaceRankError(f"{folder}: not a placerank index (index.json / index.faiss missing)")
        try:
            schema = IndexSchema(**json.loads(meta_path.read_text()))
        except (TypeError, ValueError) as e:
            raise PlaceRankError(f"{meta_path}: unreadable index schema ({e})") from None
        if schema.format != FORMAT:
            raise IndexMismatchError(f"{folder}: index format {schema.format} is not supported (expected {FORMAT})")
        check_made_by(folder, schema, model, weights_id, dimension)
        index = faiss.read_index(str(data_path))
        if index.ntotal != schema.count or index.d != schema.dimension:
            raise IndexMismatchError(f"{folder}: index.faiss ({index.ntotal} x {index.d}) does not match index.json")
        obj = cls.__new__(cls)
        obj.schema, obj.index, obj.searched_on = schema, index, "cpu"
        return obj
