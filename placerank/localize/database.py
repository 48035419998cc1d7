"""A persistent database of geotagged photos you localize new photos against.

Folder layout (``--db DB``)::

    DB/placerank.sqlite      metadata + descriptors (the source of truth)       localize/metadata.py
    DB/index.g<N>.faiss      id-mapped FAISS index for generation N (derived)    index/idmap.py
    DB/index.json            its schema (dimension, model, weights, count, N)    index/idmap.py
    DB/local/<namespace>/    re-ranker local features, keyed by image sha256     descriptors/local_store.py
    DB/write.lock            fcntl.flock lock held by the one process writing    localize/lock.py

:class:`Database` is the facade; the work is done by the shared stages (extraction in
``descriptors/``, the index in ``index/``, re-ranking in ``rerank/``) and by the modules beside
this one: :mod:`.store` (SQLite and FAISS kept in step), :mod:`.folder` (``index``), :mod:`.query`
(``localize``), :mod:`.estimate` (position and confidence), :mod:`.outputs` (files per photo).

**Concurrency**: one writer at a time (``write.lock``, released by the kernel when the process
dies); a second writer is refused at once or waits up to ``wait`` seconds. Readers (``localize``)
take no lock: SQLite gives them a consistent snapshot and, if a writer is mid-run, they rebuild the
index in memory. **Your photos are only read.**

**One precision per database**: the descriptors are extracted in the precision the database was
created with (``precision`` meta row: fp32, bf16 or fp16; none recorded = fp32), and so are photos
added later and every query; asking for another one is refused (:mod:`.model`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from placerank.descriptors.runtime import default_runtime
from placerank.errors import DataError, PlaceRankError
from placerank.index.idmap import IdMapIndex
from placerank.localize import metadata
from placerank.localize.estimate import EstimateConfig
from placerank.localize.features import LocalFeatureCache
from placerank.localize.folder import FolderIndexer, is_under, list_photos
from placerank.localize.lock import DatabaseBusyError, WriteLock
from placerank.localize.model import (
    build_model,
    check_request,
    database_precision,
    database_runtime,
    load_model,
    model_meta,
    stored_runtime,
)
from placerank.localize.query import localize
from placerank.localize.results import IndexReport, LocalizeResult, RemoveReport
from placerank.localize.store import Store

__all__ = ["DEFAULT_MODEL", "Database", "DatabaseBusyError", "WriteLock", "list_photos"]

DEFAULT_MODEL = "effnet-lite0-gem"


class Database(contextlib.AbstractContextManager):
    """A folder of geotagged photos indexed once, then used to localize new photos.

    ``Database.create(path, model=...)`` / ``Database.open(path)`` / ``Database.open_or_create``;
    then :meth:`add_folder` (alias :meth:`index`), :meth:`remove`, :meth:`localize`. The model is
    loaded on first use (``remove`` and ``info`` never load it).

    ``precision``: the one the database's descriptors are in (every extraction uses it);
    ``compile``: the model's ``--compile`` mode (auto / on / off; ``auto`` compiles an ``index``
    run large enough to repay it, never a single query); ``runtime``: what runs it (``--runtime``
    auto / torch / openvino; None: ``$PLACERANK_RUNTIME`` or auto, docs/inference.md; ``auto``:
    OpenVINO once the model is exported; a
    database below fp32 keeps the runtime it was built with, ``runtime`` meta row).
    """

    def __init__(
        self,
        folder: Path,
        conn: sqlite3.Connection,
        device="auto",
        model=None,
        weights=None,
        built=None,
        precision: str = "fp32",
        compile: str = "off",
        runtime: str | None = None,
    ):
        from placerank.utils import resolve_device

        self.folder = folder
        self.device = resolve_device(device)
        self.store = Store(folder, conn)
        self._requested = (model, weights)
        self._model = built
        self.precision, self.compile, self.runtime = precision, compile, runtime or default_runtime()
        self.features = LocalFeatureCache(folder, lambda: self.model, self.device, lambda: self.precision)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        model=DEFAULT_MODEL,
        weights=None,
        image_size=None,
        device: str = "auto",
        radius: float = 25.0,
        wait: float = 0.0,
        index: str = "flat",
        index_options: dict | None = None,
        precision: str = "fp32",
        compile: str = "off",
        runtime: str | None = None,
    ) -> Database:
        """Make a new, empty database for ``model`` (a registry name or a built VPRModel), searched
        with an index of kind ``index`` (docs/index.md), its descriptors in ``precision`` (fp32,
        bf16, fp16, or ``auto``: what the model's recall check chose on this device, docs/inference.md)."""
        from placerank.descriptors.fast import check_precision, resolve_precision, runtime_of
        from placerank.utils import resolve_device

        folder = Path(path).resolve()
        exists = f"{folder}: a placerank database already exists here (open it instead)"
        if metadata.is_initialised(folder):
            raise PlaceRankError(exists)
        if folder.exists() and not folder.is_dir():
            raise PlaceRankError(f"{folder}: exists and is not a folder")
        if radius <= 0:
            raise PlaceRankError(f"radius must be > 0 metres, got {radius}")
        dev = resolve_device(device)
        if precision != "auto":
            check_precision(precision, dev)  # before the model is built
        m = build_model(
            model if model is not None else DEFAULT_MODEL,
            weights,
            image_size,
            dev,
            compile,
            runtime or default_runtime(),
        )
        precision = resolve_precision(precision, m, dev)
        meta = model_meta(m, weights, radius, metadata.now(), precision)
        IdMapIndex(int(m.descriptor_dim), spec=index, options=index_options)  # a bad kind fails before any file
        meta.update(index=index, index_options=json.dumps(dict(index_options or {}), sort_keys=True))
        folder.mkdir(parents=True, exist_ok=True)
        with WriteLock(folder, wait):
            if metadata.is_initialised(folder):
                raise PlaceRankError(exists)
            conn = metadata.create(folder, meta)
        return cls(folder, conn, device, model, weights, m, precision, compile, runtime_of(m))

    @classmethod
    def open(
        cls,
        path: str | Path,
        model=None,
        weights=None,
        image_size=None,
        device: str = "auto",
        read_only: bool = False,
        precision: str | None = None,
        compile: str = "off",
        runtime: str | None = None,
    ) -> Database:
        """Open an existing database. ``model``/``weights``/``image_size``/``precision``, when
        given, must be the ones it was built with (refused otherwise); left out (``precision``:
        None or ``auto``), the stored ones are used. ``read_only``: nothing is ever written
        (SQLite ``mode=ro``; a stale index is rebuilt in memory only); add/remove/set_radius
        are refused."""
        folder = Path(path).resolve()
        if not metadata.is_initialised(folder):
            raise PlaceRankError(
                f"{folder}: no placerank database here (build one with `placerank index FOLDER --db {path}`)"
            )
        conn = metadata.connect(folder, read_only=read_only)
        db = cls(folder, conn, device, model, weights, compile=compile, runtime=runtime)
        db.store.read_only = read_only
        try:
            meta = db.meta()
        except sqlite3.DatabaseError as e:
            raise PlaceRankError(f"{folder / metadata.DB_FILE}: not a readable placerank database ({e})") from None
        check_request(folder, meta, model, image_size)
        db.precision = database_precision(folder, meta, precision)
        db.runtime = database_runtime(folder, meta, db.runtime)
        if (model is not None and not isinstance(model, str)) or weights is not None:
            _ = db.model  # load now so a weights mismatch is reported at open
        return db

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        model=None,
        weights=None,
        image_size=None,
        device: str = "auto",
        radius=None,
        wait=0.0,
        index: str | None = None,
        index_options: dict | None = None,
        precision: str | None = None,
        compile: str = "off",
        runtime: str | None = None,
    ) -> Database:
        """Open the database at ``path``, or create it. ``index`` (a kind, docs/index.md) and
        ``index_options``, when given, become the database's index (rebuilt on next use).
        ``precision``: a new database's (None: fp32); an existing one keeps its own (another
        explicit value is refused)."""
        if not metadata.is_initialised(Path(path).resolve()):
            try:  # ``wait``: another process may be creating it right now
                args = (model if model is not None else DEFAULT_MODEL, weights, image_size, device)
                r = 25.0 if radius is None else radius
                return cls.create(
                    path, *args, r, wait=wait, index=index or "flat", index_options=index_options,
                    precision=precision or "fp32", compile=compile, runtime=runtime,
                )  # fmt: skip
            except PlaceRankError as e:
                if not _made_meanwhile(Path(path).resolve()):
                    raise e from None
        db = cls.open(path, model, weights, image_size, device, precision=precision, compile=compile, runtime=runtime)
        if radius is not None and float(radius) != db.info()["radius_m"]:
            db.set_radius(radius)
        if index is not None or index_options:
            _check_writable(db)
            db.store.change_index(index, index_options, wait)
        return db

    def close(self) -> None:
        self.store.images.conn.close()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what it holds ----------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return self.store.meta.all()

    def __len__(self) -> int:
        return self.store.images.count()

    def info(self) -> dict:
        meta = self.meta()
        return {
            "path": str(self.folder),
            "images": len(self),
            "with_position": self.store.images.count(with_position=True),
            "model": meta["model"],
            "weights_id": meta["weights_id"],
            "weights": meta["weights_source"],
            "image_size": meta["image_size"],
            "precision": meta.get("precision") or "fp32",
            "runtime": stored_runtime(meta),
            "frame": meta["frame"] or "(none yet)",
            "radius_m": float(meta["radius"]),
            "rerankers": json.loads(meta["rerankers"]),
            "generation": int(meta["generation"]),
            "created": meta["created"],
            "index": meta.get("index") or "flat",
            "index_options": json.loads(meta.get("index_options") or "{}"),
        }

    def positions(self, epsg: int | None = None) -> np.ndarray:
        """(N,2) metres of every database photo with a position: in ``epsg`` (a UTM zone) for a
        WGS84 database, else the local frame. For maps."""
        return self.store.images.positions(epsg)

    @property
    def model(self):
        """The VPR model this database was built with (loaded on first use, then checked)."""
        if self._model is None:
            self._model = load_model(
                self.folder, self.meta(), *self._requested, self.device, self.compile, self.runtime
            )
        return self._model

    # -- changing it ------------------------------------------------------------------------------
    def set_radius(self, radius: float, wait: float = 0.0) -> None:
        _check_writable(self)
        if radius <= 0:
            raise PlaceRankError(f"radius must be > 0 metres, got {radius}")
        with self.store.slot.hold(wait), self.store.meta.transaction():
            self.store.meta.set("radius", repr(float(radius)))

    def add_folder(
        self,
        folder: str | Path | None = None,
        positions: str | Path | None = None,
        allow_no_gps: bool = False,
        rerank: str | None = None,
        rerank_options: dict | None = None,
        prune: bool = False,
        batch_size: int = 16,
        num_workers: int | None = None,
        wait: float = 0.0,
        progress: bool = True,
        log=None,
        nproc: int = 1,
    ) -> IndexReport:
        """Index every photo under ``folder`` (jpg/jpeg/png, recursive) with its EXIF GPS, or the
        photos of a ``positions`` CSV (those under ``folder`` when both are given). Only new or
        changed photos are read; with ``rerank`` their local features are stored too.
        ``log``: callable for one-line progress notes (the CLI passes ``print``); ``nproc`` > 1:
        new photos' global descriptors from that many local ranks (``--nproc``)."""
        _check_writable(self)
        say = log or (lambda msg: None)
        indexer = FolderIndexer(self.store, self.features, lambda: self.model, say, progress, nproc)
        with self.store.slot.hold(wait):
            self.store.index()
            report = indexer.run(
                folder, positions, allow_no_gps, rerank, rerank_options, prune, batch_size, num_workers
            )
        report.total = len(self)
        return report

    index = add_folder  # the command's name for it

    def remove(self, paths: Sequence[str | Path], wait: float = 0.0) -> RemoveReport:
        """Drop photos (or every photo under a folder) from the database. The photos themselves
        are not touched. Their local features stay in the store (keyed by content) until the
        database is rebuilt."""
        _check_writable(self)
        report = RemoveReport()
        with self.store.slot.hold(wait):
            self.store.index()
            known = list(self.store.images.files())
            targets: list[str] = []
            for raw in paths:
                p = Path(raw).expanduser().resolve()
                hits = [k for k in known if k == str(p) or is_under(Path(k), p)]
                if not hits:
                    report.not_found.append(str(raw))
                targets.extend(h for h in hits if h not in targets)
            try:
                if targets:
                    report.removed = self.store.remove(targets)
            finally:
                self.store.save_index()
        if report.not_found and not report.removed:
            raise DataError(
                f"{report.not_found[0]}: not in the database {self.folder}"
                + (f" (nor {len(report.not_found) - 1} other path(s))" if len(report.not_found) > 1 else "")
            )
        return report

    # -- localizing -------------------------------------------------------------------------------
    def localize(
        self,
        image: str | Path,
        top_k: int = 10,
        rerank: str | None = None,
        radius: float | None = None,
        rerank_options: dict | None = None,
        estimate: EstimateConfig | None = None,
    ) -> LocalizeResult:
        """Estimate where ``image`` was taken: retrieve the ``top_k`` most similar database photos
        (optionally re-ranked), then a score-weighted position of those that agree with the best
        one (see :mod:`placerank.localize.estimate`)."""
        return localize(self.store, self.features, self.model, image, top_k, rerank, radius, rerank_options, estimate)


def _check_writable(db: Database) -> None:
    if db.store.read_only:
        raise PlaceRankError(f"{db.folder}: opened read-only; open it without read_only to change it")


def _made_meanwhile(folder: Path) -> bool:
    """After a failed create: whether another process made the database meanwhile."""
    try:
        return metadata.is_initialised(folder)
    except PlaceRankError:
        return False
