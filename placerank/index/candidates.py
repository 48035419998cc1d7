"""The search stage and its output, the candidates file the re-rank stage reads.

``DIR/candidates.npz`` holds ``ids`` (Q, K) int64 database rows, best first (-1 = no candidate),
``similarities`` (Q, K) float32 first-stage inner products of those rows, and after re-ranking
``scores`` (Q, top_k) float64 re-ranker scores of the first ``top_k`` in the new order.
``DIR/candidates.json`` says what they are: {format, kind, stage ("search" | "rerank"), model,
weights_id, num_queries, num_database, depth, arrays_sha256, database / queries {descriptors
folder, fingerprint, paths}, rerank {name, signature, top_k, options, input fingerprint} or null,
fingerprint, index {spec, options, train_size, bytes, bytes_per_image, build_s, search_ms_per_query}
of the first-stage index, or null in files from before index kinds}. Arrays first, JSON last, both atomic. Loading checks every shape, id range and the
arrays' hash, so a file from another run is refused in one line. See ``docs/pipeline.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from placerank.errors import PlaceRankError
from placerank.index.factory import build_index
from placerank.utils import atomic_path, read_stage_json, write_json_atomic

FORMAT = 1
KIND = "placerank-candidates"


@dataclass
class Candidates:
    """Top-K database candidates per query, with where they came from."""

    ids: np.ndarray
    similarities: np.ndarray
    database_paths: list[str]
    query_paths: list[str]
    model: str = ""
    weights_id: str = ""
    database: dict = field(default_factory=dict)  # {"descriptors": folder, "fingerprint": ...}
    queries: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    rerank: dict | None = None
    index: dict | None = None  # the first-stage index: VPRIndex.describe() + search_ms_per_query

    @property
    def stage(self) -> str:
        return "search" if self.rerank is None else "rerank"

    @property
    def depth(self) -> int:
        return int(self.ids.shape[1])

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "ids": np.ascontiguousarray(self.ids, dtype=np.int64),
            "similarities": np.ascontiguousarray(self.similarities, dtype=np.float32),
        }
        if self.scores is not None:
            arrays["scores"] = np.ascontiguousarray(self.scores, dtype=np.float64)
        return arrays

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, a in sorted(self._arrays().items()):
            h.update(name.encode())
            h.update(a.tobytes())
        h.update(json.dumps([self.database.get("fingerprint"), self.queries.get("fingerprint"), self.rerank]).encode())
        return h.hexdigest()[:32]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())  # type: ignore[arg-type]
        data = buf.getvalue()
        with atomic_path(folder / "candidates.npz") as tmp:
            tmp.write_bytes(data)
        meta = {
            "format": FORMAT,
            "kind": KIND,
            "stage": self.stage,
            "model": self.model,
            "weights_id": self.weights_id,
            "num_queries": int(self.ids.shape[0]),
            "num_database": len(self.database_paths),
            "depth": self.depth,
            "arrays_sha256": hashlib.sha256(data).hexdigest(),
            "fingerprint": self.fingerprint(),
            "rerank": self.rerank,
            "index": self.index,
            "database": {**self.database, "paths": self.database_paths},
            "queries": {**self.queries, "paths": self.query_paths},
        }
        write_json_atomic(folder / "candidates.json", meta)


def _bad(folder: Path, why: str) -> PlaceRankError:
    return PlaceRankError(f"{folder}: not a usable candidates folder ({why})")


def read_candidates_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    need = ("stage", "num_queries", "num_database", "depth", "arrays_sha256", "database", "queries", "fingerprint")
    return read_stage_json(folder / "candidates.json", KIND, FORMAT, need, lambda why: _bad(folder, why))


def load_candidates(folder: str | Path) -> Candidates:
    """Read and validate a candidates folder; every inconsistency is one :class:`PlaceRankError`."""
    folder = Path(folder)
    meta = read_candidates_meta(folder)
    npz = folder / "candidates.npz"
    if not npz.is_file():
        raise _bad(folder, "candidates.npz missing")
    data = npz.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["arrays_sha256"]:
        raise _bad(folder, "candidates.npz does not belong to candidates.json (hash differs)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise _bad(folder, f"candidates.npz is unreadable: {e}") from None
    q, n, k = int(meta["num_queries"]), int(meta["num_database"]), int(meta["depth"])
    ids, sims = arrays.get("ids"), arrays.get("similarities")
    if ids is None or sims is None or ids.shape != (q, k) or sims.shape != (q, k):
        raise _bad(folder, f"arrays do not have the ({q}, {k}) shape candidates.json gives")
    if ids.size and (ids.min() < -1 or ids.max() >= n):
        raise _bad(folder, f"candidate ids outside the {n} database images")
    db_paths, q_paths = meta["database"].get("paths", []), meta["queries"].get("paths", [])
    if len(db_paths) != n or len(q_paths) != q:
        raise _bad(folder, "candidates.json path lists do not match its counts")
    scores = arrays.get("scores")
    if meta["stage"] == "rerank" and (scores is None or meta.get("rerank") is None):
        raise _bad(folder, "re-ranked candidates without scores")
    return Candidates(
        ids=ids,
        similarities=sims,
        database_paths=[str(p) for p in db_paths],
        query_paths=[str(p) for p in q_paths],
        model=str(meta.get("model", "")),
        weights_id=str(meta.get("weights_id", "")),
        database={k: v for k, v in meta["database"].items() if k != "paths"},
        queries={k: v for k, v in meta["queries"].items() if k != "paths"},
        scores=scores,
        rerank=meta.get("rerank"),
        index=meta.get("index"),
    )


def search(
    database, queries, depth: int, device=None, index_spec: str = "flat", index_options: dict | None = None
) -> Candidates:
    """The search stage: top-``depth`` database rows per query by inner product, from an index of
    kind ``index_spec`` (:func:`~placerank.index.factory.build_index`: "flat", "IVF1024,Flat", ...;
    search options such as {"nprobe": "32"}), chunked over queries, on the GPU with faiss-gpu and a
    CUDA ``device``. ``database`` / ``queries`` are :class:`~placerank.descriptors.files.DescriptorSet`
    of the same model and weights; their descriptors may be memory-mapped (read in chunks)."""
    made = [(d.model, d.weights_id, d.preprocess) for d in (database, queries)]
    if made[0] != made[1]:
        a, b = (f"{m} (weights {w}, input {p.split('-')[0]})" for m, w, p in made)
        raise PlaceRankError(
            f"database descriptors are {a} but query descriptors are {b}: extract both with the same model, "
            "weights and input size"
        )
    if database.descriptors.shape[1] != queries.descriptors.shape[1]:
        raise PlaceRankError(
            f"database descriptors are {database.descriptors.shape[1]}-d, queries {queries.descriptors.shape[1]}-d"
        )
    index = build_index(
        database.descriptors, index_spec, index_options, model=database.model, weights_id=database.weights_id
    )
    start = time.perf_counter()
    sims, ids = index.search(queries.descriptors, depth, device=device)
    ms = 1000 * (time.perf_counter() - start) / max(len(queries.paths), 1)

    def side(ds) -> dict:
        return {"descriptors": str(ds.folder) if ds.folder is not None else None, "fingerprint": ds.fingerprint}

    return Candidates(
        ids=ids,
        similarities=sims,
        database_paths=list(database.paths),
        query_paths=list(queries.paths),
        model=database.model,
        weights_id=database.weights_id,
        database=side(database),
        queries=side(queries),
        index={**index.describe(), "search_ms_per_query": round(ms, 4)},
    )


def search_folders(
    database: str | Path,
    queries: str | Path,
    depth: int,
    out: str | Path,
    index_spec: str = "flat",
    index_options: dict | None = None,
) -> tuple[Candidates, bool]:
    """``placerank search``: descriptor folders -> candidates folder ``out``. Returns
    (candidates, skipped): an ``out`` that already holds this search (same index spec and options
    too) is left as it is."""
    from placerank.descriptors.files import load_descriptors

    db, q = load_descriptors(database), load_descriptors(queries)
    depth = min(int(depth), len(db))
    if depth < 1:
        raise PlaceRankError(f"--top-k must be >= 1, got {depth}")
    out = Path(out)
    try:
        meta = read_candidates_meta(out)
        same = (
            meta["stage"] == "search"
            and meta["database"].get("fingerprint") == db.fingerprint
            and meta["queries"].get("fingerprint") == q.fingerprint
            and int(meta["depth"]) == depth
            and (meta.get("index") or {"spec": "flat", "options": {}}).get("spec") == index_spec
            and (meta.get("index") or {}).get("options", {}) == _effective_options(db, index_spec, index_options)
        )
        if same:
            return load_candidates(out), True
    except PlaceRankError:
        pass
    candidates = search(db, q, depth, index_spec=index_spec, index_options=index_options)
    candidates.save(out)
    return candidates, False


def _effective_options(db, index_spec: str, index_options: dict | None) -> dict:
    """The options a search of ``index_spec`` would record (defaults such as IVF's nprobe included)."""
    from placerank.index import spec as S

    empty = S.make_index(int(db.descriptors.shape[1]), index_spec)
    options = S.normalize_options(index_options)
    options.pop("on_disk", None)  # where the lists live, not how the search runs
    return S.with_defaults(empty, options)
