"""A persistent database of geotagged photos you localize new photos against.

Folder layout (``--db DB``)::

    DB/placerank.sqlite      metadata + descriptors (the source of truth)
    DB/index.g<N>.faiss      FAISS IndexIDMap2(IndexFlatIP) for generation N (a derived cache)
    DB/local/<namespace>/    re-ranker local features (LocalFeatureStore), keyed by image sha256
    DB/write.lock            fcntl.flock lock held by the one process allowed to write

**SQLite** (WAL mode, ``synchronous=FULL``) holds a ``meta`` table (format, model name, weights
hash = the parameter hash the descriptor cache also uses, weights file, preprocessing, position
frame, default radius, re-rankers, *generation*) and an ``images`` table (absolute path, sha256,
mtime, size, lat/lon, UTM easting/northing + EPSG zone, where the position came from, the
float32 global descriptor). Every change is one transaction that also increments ``generation``.

**FAISS** keeps image row ids (``IndexIDMap2``), so removing photos is ``remove_ids`` rather than
a rebuild. The index file carries the generation in its name and is written to a temporary file
and renamed. On open, the index file for the database's current generation is used if its ids
equal the rows' ids; otherwise (a crash between the SQLite commit and the index write, a deleted or
damaged file) the index is rebuilt from the descriptors stored in SQLite and saved again. So the
two can never disagree, and an interrupted ``index`` run loses at most the batch in flight.

**Concurrency**: one writer at a time (``write.lock``, ``fcntl.flock``: released by the kernel
when the process dies, so a crash never leaves a stale lock); a second writer is refused at once
or waits up to ``wait`` seconds. Readers (``localize``) take no lock: SQLite gives them a
consistent snapshot and, if a writer is mid-run, they rebuild the index in memory.

**Your photos are only read** (opened read-only for decoding, EXIF and sha256).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from placerank.data.exif import GpsReading, read_gps
from placerank.data.positions import (
    LOCAL,
    WGS84,
    Position,
    project_latlon,
    read_positions_csv,
    unproject,
    utm_label,
)
from placerank.errors import DataError, IndexMismatchError, PlaceRankError
from placerank.localize.estimate import EstimateConfig, estimate_position
from placerank.utils import atomic_path

FORMAT = 1
DB_FILE = "placerank.sqlite"
LOCK_FILE = "write.lock"
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_MODEL = "effnet-lite0-gem"


class DatabaseBusyError(PlaceRankError):
    """Another process holds the database's write lock."""


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class IndexReport:
    """What one ``index`` run did; every skipped or failed photo is listed with its reason."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # content changed: re-extracted
    unchanged: int = 0
    touched: list[str] = field(default_factory=list)  # mtime changed, same sha256: nothing extracted
    position_updated: list[str] = field(default_factory=list)
    reused: int = 0  # same content already indexed under another path
    extracted: int = 0  # global descriptors computed this run
    local_extracted: int = 0
    no_position: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    missing_on_disk: list[str] = field(default_factory=list)
    not_in_csv: int = 0
    total: int = 0  # images in the database afterwards

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{self.unchanged} unchanged"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.no_position:
            parts.append(f"{len(self.no_position)} skipped (no position)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts) + f"; {self.total} images in the database"


@dataclass
class RemoveReport:
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


@dataclass
class Match:
    """One of the top database photos for a query."""

    rank: int
    path: str
    similarity: float  # cosine similarity of the global descriptors
    rerank_score: float | None  # re-ranker score (e.g. RANSAC inliers); None without --rerank
    weight: float  # weight in the position estimate (0 = no position)
    agrees: bool  # within radius of the place-defining best match
    distance_m: float | None  # metres from the estimate
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None
    utm_zone: str


@dataclass
class QueryGps:
    """The query photo's own EXIF GPS, when it has one: a check of the estimate, not an input."""

    lat: float
    lon: float
    error_m: float | None  # metres between the estimate and this GPS


@dataclass
class LocalizeResult:
    """Where a photo was taken, as estimated from the database (see :mod:`.estimate`)."""

    query: str
    frame: str  # 'wgs84' (lat/lon + UTM) or 'local' (metres only)
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None
    utm_zone: str  # e.g. '33N'; '' in a local frame
    confidence: float
    share: float
    margin: float | None
    margin_factor: float
    radius_m: float
    matches: list[Match]
    model: str
    weights_id: str
    rerank: str | None
    database: str
    database_size: int
    query_gps: QueryGps | None = None
    timing_s: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict, repr=False, compare=False)  # pictures only; not saved

    @property
    def found(self) -> bool:
        return self.easting is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("extras")
        return d

    def save_json(self, path: str | Path) -> None:
        from placerank.utils import write_json_atomic

        write_json_atomic(path, self.to_json())


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------
class WriteLock:
    """Exclusive ``fcntl.flock`` on ``DB/write.lock``; the holder's pid is written into it so the
    refusal can name the other process."""

    def __init__(self, folder: Path, wait: float = 0.0):
        self.path = folder / LOCK_FILE
        self.wait = float(wait)
        self._fd: int | None = None

    def __enter__(self) -> WriteLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, self.wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    how = f"after waiting {self.wait:g} s" if self.wait > 0 else "now"
                    raise DatabaseBusyError(
                        f"{self.path.parent}: another placerank process (pid {holder}) is writing to this "
                        f"database {how}; wait for it to finish or pass --wait SECONDS"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    lat REAL, lon REAL, easting REAL, northing REAL, epsg INTEGER,
    position_source TEXT NOT NULL,
    height INTEGER, width INTEGER,
    descriptor BLOB NOT NULL,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
"""

_ROW_COLS = "id, path, sha256, lat, lon, easting, northing, epsg"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def list_photos(folder: Path) -> list[Path]:
    """Every .jpg/.jpeg/.png under ``folder`` (recursive), skipping hidden files and folders."""
    from placerank.data.readers import list_images

    folder = Path(folder).resolve()
    return [
        p
        for p in list_images(folder, recursive=True)
        if p.suffix.lower() in PHOTO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


class Database:
    """A folder of geotagged photos indexed once, then used to localize new photos.

    ``Database.create(path, model=...)`` / ``Database.open(path)`` / ``Database.open_or_create``;
    then :meth:`add_folder` (alias :meth:`index`), :meth:`remove`, :meth:`localize`. The model is
    loaded on first use (``remove`` and ``info`` never load it).
    """

    def __init__(
        self, folder: Path, conn: sqlite3.Connection, device: str = "auto", model=None, weights=None, image_size=None
    ):
        self.folder = folder
        self._conn = conn
        self._device_arg = device
        self._model = None
        self._requested = (model, weights, image_size)
        self._index = None
        self._index_gen = -1
        self._lock: WriteLock | None = None
        self._rerankers: dict[tuple, object] = {}
        self.index_rebuilt = False  # True when the last index load had to rebuild from SQLite

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _connect(folder: Path) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(folder / DB_FILE, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise PlaceRankError(f"{folder / DB_FILE}: not a readable placerank database ({e})") from None
        return conn

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
    ) -> Database:
        """Make a new, empty database for ``model`` (a registry name or a built VPRModel)."""
        folder = Path(path).resolve()
        if _is_initialised(folder):
            raise PlaceRankError(f"{folder}: a placerank database already exists here (open it instead)")
        if folder.exists() and not folder.is_dir():
            raise PlaceRankError(f"{folder}: exists and is not a folder")
        if radius <= 0:
            raise PlaceRankError(f"radius must be > 0 metres, got {radius}")
        db = cls(folder, None, device, model, weights, image_size)  # type: ignore[arg-type]
        m = db._build_model(model if model is not None else DEFAULT_MODEL, weights, image_size)
        if m.needs_data_init:
            # Its k-means initialisation depends on data and is not part of any weights file, so a
            # database built with it could never be reopened with the same model.
            raise PlaceRankError(
                f"model '{m.name}' needs data-driven initialisation (NetVLAD k-means) before a database can store "
                f"its descriptors; train or initialise it, save a placerank checkpoint and pass it with --weights"
            )
        folder.mkdir(parents=True, exist_ok=True)
        with WriteLock(folder, wait):
            if _is_initialised(folder):
                raise PlaceRankError(f"{folder}: a placerank database already exists here (open it instead)")
            conn = cls._connect(folder)
            weights_path = str(Path(weights).resolve()) if isinstance(weights, (str, Path)) else ""
            meta = {
                "format": str(FORMAT),
                "created": _now(),
                "model": m.name,
                "weights_id": m.weights_id,
                "weights_source": m.weights_source,
                "weights_path": weights_path,
                "descriptor_dim": str(m.descriptor_dim),
                "preprocess": m.preprocess.signature(),
                "image_size": f"{m.preprocess.size[0]},{m.preprocess.size[1]}",
                "frame": "",
                "radius": repr(float(radius)),
                "generation": "0",
                "rerankers": "{}",
            }
            # Schema and metadata in one transaction: a crash here leaves no half-made database.
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            conn.execute("COMMIT")
        db._conn = conn
        db._model = m
        return db

    @classmethod
    def open(cls, path: str | Path, model=None, weights=None, image_size=None, device: str = "auto") -> Database:
        """Open an existing database. ``model``/``weights``/``image_size``, when given, must be the
        ones it was built with (refused otherwise); left out, the stored ones are used."""
        folder = Path(path).resolve()
        if not _is_initialised(folder):
            raise PlaceRankError(
                f"{folder}: no placerank database here (build one with `placerank index FOLDER --db {path}`)"
            )
        conn = cls._connect(folder)
        db = cls(folder, conn, device, model, weights, image_size)
        try:
            meta = db.meta()
        except sqlite3.DatabaseError as e:
            raise PlaceRankError(f"{folder / DB_FILE}: not a readable placerank database ({e})") from None
        if meta.get("format") != str(FORMAT):
            raise IndexMismatchError(
                f"{folder}: database format {meta.get('format')} is not supported (expected {FORMAT})"
            )
        name = model if isinstance(model, str) else getattr(model, "name", None)
        if name is not None and name != meta["model"]:
            raise IndexMismatchError(
                f"{folder}: database was built with model '{meta['model']}', not '{name}'; use a new --db for another model"
            )
        if image_size is not None and (model is None or isinstance(model, str)):
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
            stored = tuple(int(v) for v in meta["image_size"].split(","))
            if size != stored:
                raise IndexMismatchError(
                    f"{folder}: database was built at image size {stored[0]}x{stored[1]}, not {size[0]}x{size[1]}"
                )
        if (model is not None and not isinstance(model, str)) or weights is not None:
            db.model  # load now so a weights mismatch is reported at open
        return db

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        model=None,
        weights=None,
        image_size=None,
        device: str = "auto",
        radius: float | None = None,
    ) -> Database:
        if _is_initialised(Path(path).resolve()):
            db = cls.open(path, model, weights, image_size, device)
            if radius is not None and float(radius) != db.radius:
                db.set_radius(radius)
            return db
        return cls.create(
            path,
            model if model is not None else DEFAULT_MODEL,
            weights,
            image_size,
            device,
            radius=25.0 if radius is None else radius,
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata -----------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self._conn.execute("SELECT key, value FROM meta"))

    def _meta_get(self, key: str) -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else ""

    def _generation(self) -> int:
        return int(self._meta_get("generation") or 0)

    @property
    def radius(self) -> float:
        return float(self._meta_get("radius") or 25.0)

    @property
    def frame(self) -> str:
        return self._meta_get("frame")

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def info(self) -> dict:
        meta = self.meta()
        with_pos = self._conn.execute("SELECT COUNT(*) FROM images WHERE easting IS NOT NULL").fetchone()[0]
        return {
            "path": str(self.folder),
            "images": len(self),
            "with_position": int(with_pos),
            "model": meta["model"],
            "weights_id": meta["weights_id"],
            "weights": meta["weights_source"],
            "image_size": meta["image_size"],
            "frame": meta["frame"] or "(none yet)",
            "radius_m": float(meta["radius"]),
            "rerankers": json.loads(meta["rerankers"]),
            "generation": int(meta["generation"]),
            "created": meta["created"],
        }

    def set_radius(self, radius: float, wait: float = 0.0) -> None:
        if radius <= 0:
            raise PlaceRankError(f"radius must be > 0 metres, got {radius}")
        with self._writing(wait):
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("UPDATE meta SET value=? WHERE key='radius'", (repr(float(radius)),))
            self._conn.execute("COMMIT")

    # -- model ---------------------------------------------------------------------------------
    @property
    def device(self):
        from placerank.utils import resolve_device

        return resolve_device(self._device_arg)

    def _build_model(self, model, weights, image_size):
        if not isinstance(model, str):
            return model.to(self.device).eval()
        from placerank.models import create

        kwargs = (
            {"image_size": tuple(image_size) if not isinstance(image_size, int) else (image_size, image_size)}
            if image_size is not None
            else {}
        )
        return create(model, weights=weights, **kwargs).to(self.device).eval()

    @property
    def model(self):
        """The VPR model this database was built with (loaded on first use, then checked)."""
        if self._model is None:
            meta = self.meta()
            req_model, req_weights, _ = self._requested
            size = tuple(int(v) for v in meta["image_size"].split(","))
            if req_model is not None and not isinstance(req_model, str):
                m = self._build_model(req_model, None, None)
            else:
                weights = req_weights if req_weights is not None else (meta["weights_path"] or None)
                if weights is not None and not Path(weights).exists():
                    raise PlaceRankError(
                        f"{self.folder}: the weights file it was built with is gone ({weights}); pass --weights with a copy of it"
                    )
                m = self._build_model(meta["model"], weights, size)
            if m.name != meta["model"]:
                raise IndexMismatchError(
                    f"{self.folder}: database was built with model '{meta['model']}', not '{m.name}'; use a new --db for another model"
                )
            if m.weights_id != meta["weights_id"]:
                raise IndexMismatchError(
                    f"{self.folder}: database was built with other weights (id {meta['weights_id']}) than the ones "
                    f"given ({m.weights_id}, {m.weights_source}); use the original weights or a new --db"
                )
            if m.preprocess.signature() != meta["preprocess"]:
                raise IndexMismatchError(
                    f"{self.folder}: database was built with preprocessing {meta['preprocess']}, "
                    f"not {m.preprocess.signature()}"
                )
            self._model = m
        return self._model

    # -- locking / transactions ---------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, wait: float = 0.0) -> Iterator[None]:
        if self._lock is not None:  # re-entrant within one Database object
            yield
            return
        lock = WriteLock(self.folder, wait)
        with lock:
            self._lock = lock
            try:
                yield
            finally:
                self._lock = None

    @contextlib.contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _bump_generation(self) -> int:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return self._generation()

    # -- FAISS index ----------------------------------------------------------------------------
    def _index_path(self, gen: int) -> Path:
        return self.folder / f"index.g{gen}.faiss"

    def _ensure_index(self):
        """The in-memory index for the database's current generation (loaded, or rebuilt from
        the stored descriptors when the file is missing, stale or damaged)."""
        import faiss

        if self._index is not None and self._index_gen == self._generation():
            return self._index
        dim = int(self._meta_get("descriptor_dim"))
        rebuilt = False
        with self._read_snapshot():
            gen = self._generation()
            ids = np.array([r[0] for r in self._conn.execute("SELECT id FROM images ORDER BY id")], dtype=np.int64)
            index = None
            path = self._index_path(gen)
            if path.exists():
                try:
                    candidate = faiss.read_index(str(path))
                    stored = np.sort(faiss.vector_to_array(candidate.id_map).astype(np.int64))
                    if candidate.d == dim and candidate.ntotal == len(ids) and np.array_equal(stored, ids):
                        index = candidate
                except (RuntimeError, AttributeError):
                    index = None  # damaged or foreign file: rebuilt below
            if index is None:
                rebuilt = True
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
                chunk_ids, chunk_vecs = [], []
                for row_id, blob in self._conn.execute("SELECT id, descriptor FROM images ORDER BY id"):
                    chunk_ids.append(row_id)
                    chunk_vecs.append(np.frombuffer(blob, dtype=np.float32))
                    if len(chunk_ids) >= 4096:
                        index.add_with_ids(np.stack(chunk_vecs), np.array(chunk_ids, dtype=np.int64))
                        chunk_ids, chunk_vecs = [], []
                if chunk_ids:
                    index.add_with_ids(np.stack(chunk_vecs), np.array(chunk_ids, dtype=np.int64))
        self._index, self._index_gen = index, gen
        self.index_rebuilt = rebuilt
        if rebuilt:
            self._try_save_index()
        return index

    def _try_save_index(self) -> None:
        """Save the in-memory index if this process may write (holds or can take the lock)."""
        if self._lock is not None:
            self._save_index()
            return
        try:
            with self._writing(0.0):
                if self._generation() == self._index_gen:
                    self._save_index()
        except (DatabaseBusyError, OSError):
            pass  # a writer is busy (it saves its own index) or the folder is read-only

    def _save_index(self) -> None:
        import faiss

        gen = self._index_gen
        target = self._index_path(gen)
        with atomic_path(target) as tmp:
            faiss.write_index(self._index, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for old in self.folder.glob("index.g*.faiss"):
            if old != target:
                with contextlib.suppress(OSError):
                    old.unlink()

    # -- adding photos ---------------------------------------------------------------------------
    def index(self, *args, **kwargs) -> IndexReport:
        """Alias of :meth:`add_folder`."""
        return self.add_folder(*args, **kwargs)

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
    ) -> IndexReport:
        """Index every photo under ``folder`` (jpg/jpeg/png, recursive) with its EXIF GPS, or the
        photos of a ``positions`` CSV (those under ``folder`` when both are given). Only new or
        changed photos are read; with ``rerank`` their local features are stored too.
        ``log``: callable for one-line progress notes (the CLI passes ``print``)."""
        say = log or (lambda msg: None)
        report = IndexReport()
        csv_pos = read_positions_csv(positions) if positions is not None else None
        root = Path(folder).resolve() if folder is not None else None
        if root is None and csv_pos is None:
            raise PlaceRankError("give a folder of photos, a --positions CSV, or both")
        if root is not None:
            if not root.is_dir():
                raise DataError(f"{folder}: folder does not exist" if not root.exists() else f"{folder}: not a folder")
            files = list_photos(root)
        else:
            files = []
        if csv_pos is not None:
            listed = sorted(p for p in csv_pos if root is None or _is_under(p, root))
            report.not_in_csv = len(set(files) - set(listed))
            for p in listed:
                if not p.exists():
                    report.failed.append((str(p), f"{p}: listed in {positions} but the file does not exist"))
            files = [p for p in listed if p.exists()]
            frames = {pos.frame for pos in csv_pos.values()}
            if len(frames) > 1:
                raise DataError(
                    f"{positions}: some rows have a UTM zone and some do not; give every row the same kind of position"
                )
        files = [p for p in files if not _is_under(p, self.folder)]
        if not files and not prune:
            where = folder if folder is not None else positions
            raise DataError(f"{where}: no .jpg/.jpeg/.png photos found")

        with self._writing(wait):
            index = self._ensure_index()
            rows = {
                r[0]: r
                for r in self._conn.execute(
                    "SELECT path, id, sha256, mtime_ns, size, lat, lon, easting, northing, epsg FROM images"
                )
            }
            # The frame is fixed by the first photo with a position (an emptied database is free again).
            has_pos = self._conn.execute("SELECT 1 FROM images WHERE easting IS NOT NULL LIMIT 1").fetchone()
            db_frame = self.frame if has_pos else ""
            todo: list[dict] = []  # photos needing a descriptor (new or changed content)
            plain_updates: list[tuple] = []  # (sql, params) for rows whose content is unchanged
            stale: list[str] = []  # indexed photos whose new content cannot be indexed

            def check_frame(pos: Position, p: Path) -> None:
                nonlocal db_frame
                if db_frame and pos.frame != db_frame:
                    raise DataError(_frame_error(self.folder, db_frame, pos.frame, p))
                db_frame = pos.frame

            for p in files:
                key = str(p)
                try:
                    st = p.stat()
                except OSError as e:
                    report.failed.append((key, f"{p}: cannot read file ({e.strerror or e})"))
                    continue
                old = rows.get(key)
                pos = csv_pos.get(p) if csv_pos is not None else None
                if old is not None and old[3] == st.st_mtime_ns and old[4] == st.st_size:
                    if pos is not None and not _same_position(old, pos):
                        check_frame(pos, p)
                        plain_updates.append((_POS_UPDATE, (*_pos_values(pos), f"csv:{Path(positions).name}", old[1])))
                        report.position_updated.append(key)
                    else:
                        report.unchanged += 1
                    continue
                try:
                    sha = _sha256(p)
                except OSError as e:
                    report.failed.append((key, f"{p}: cannot read file ({e.strerror or e})"))
                    continue
                if old is not None and old[2] == sha:
                    params = (st.st_mtime_ns, st.st_size, old[1])
                    plain_updates.append(("UPDATE images SET mtime_ns=?, size=? WHERE id=?", params))
                    if pos is not None and not _same_position(old, pos):
                        check_frame(pos, p)
                        plain_updates.append((_POS_UPDATE, (*_pos_values(pos), f"csv:{Path(positions).name}", old[1])))
                        report.position_updated.append(key)
                    report.touched.append(key)
                    continue
                source = f"csv:{Path(positions).name}" if csv_pos is not None else "exif"
                if pos is None and csv_pos is None:
                    try:
                        gps = read_gps(p)
                    except DataError as e:
                        report.failed.append((key, str(e)))
                        if old is not None:
                            stale.append(key)
                        continue
                    if isinstance(gps, GpsReading):
                        pos = Position.from_latlon(gps.lat, gps.lon)
                    elif (bad := _not_an_image(p)) is not None:
                        report.failed.append((key, bad))  # say "unreadable", not "no GPS"
                        if old is not None:
                            stale.append(key)
                        continue
                    elif not allow_no_gps:
                        report.no_position.append(
                            (key, f"{p}: {gps.reason}; skipped (give --positions CSV or --allow-no-gps)")
                        )
                        if old is not None:
                            stale.append(key)
                        continue
                    else:
                        source = f"none ({gps.reason})"
                if pos is not None:
                    check_frame(pos, p)
                todo.append(
                    {
                        "path": p,
                        "sha": sha,
                        "st": st,
                        "pos": pos,
                        "source": source,
                        "old_id": old[1] if old is not None else None,
                    }
                )

            if plain_updates or (db_frame and db_frame != self.frame):
                self._conn.execute("BEGIN IMMEDIATE")
                for sql, params in plain_updates:
                    self._conn.execute(sql, params)
                self._conn.execute("UPDATE meta SET value=? WHERE key='frame'", (db_frame,))
                self._conn.execute("COMMIT")

            dirty = False
            try:
                # Content already in the database under another path: reuse its descriptor.
                fresh = []
                for item in todo:
                    hit = self._conn.execute(
                        "SELECT descriptor, height, width FROM images WHERE sha256=? LIMIT 1", (item["sha"],)
                    ).fetchone()
                    if hit is not None:
                        item["desc"] = np.frombuffer(hit[0], dtype=np.float32)
                        item["hw"] = (hit[1], hit[2])
                        self._commit_items([item], report)
                        dirty = True
                        report.reused += 1
                    else:
                        fresh.append(item)
                if fresh:
                    say(f"extracting {len(fresh)} photo(s) with {self.model.name} on {self.device}")
                    dirty |= self._extract_and_commit(fresh, report, batch_size, num_workers, progress, stale)
                if stale:  # changed on disk into something unindexable: the old descriptor is wrong now
                    report.removed.extend(self._remove_rows(stale))
                    dirty = True
                if prune and root is not None:
                    gone = [p for p in rows if _is_under(Path(p), root) and not Path(p).exists()]
                    if gone:
                        report.removed.extend(self._remove_rows(gone))
                        dirty = True
                elif root is not None:
                    report.missing_on_disk = sorted(
                        p for p in rows if _is_under(Path(p), root) and not Path(p).exists()
                    )
            finally:
                if dirty:
                    self._save_index()
            if rerank:
                report.local_extracted = self._store_local_features(
                    rerank, rerank_options, report, num_workers, progress, say
                )
        report.total = len(self)
        return report

    def _commit_items(self, items: list[dict], report: IndexReport) -> None:
        """One transaction for a batch of extracted photos, then the same change in the index."""
        now = _now()
        old_ids, new_ids, vecs = [], [], []
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for it in items:
                if it["old_id"] is not None:
                    self._conn.execute("DELETE FROM images WHERE id=?", (it["old_id"],))
                    old_ids.append(it["old_id"])
                pos = it["pos"]
                values = _pos_values(pos) if pos is not None else (None, None, None, None, None)
                cur = self._conn.execute(
                    "INSERT INTO images (path, sha256, mtime_ns, size, lat, lon, easting, northing, epsg, "
                    "position_source, height, width, descriptor, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        str(it["path"]),
                        it["sha"],
                        it["st"].st_mtime_ns,
                        it["st"].st_size,
                        *values,
                        it["source"],
                        it["hw"][0],
                        it["hw"][1],
                        np.ascontiguousarray(it["desc"], dtype=np.float32).tobytes(),
                        now,
                    ),
                )
                new_ids.append(cur.lastrowid)
                vecs.append(it["desc"])
            gen = self._bump_generation()
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if old_ids:
            self._index.remove_ids(np.array(old_ids, dtype=np.int64))
        self._index.add_with_ids(np.stack(vecs).astype(np.float32), np.array(new_ids, dtype=np.int64))
        self._index_gen = gen
        for it in items:
            (report.updated if it["old_id"] is not None else report.added).append(str(it["path"]))

    def _extract_and_commit(
        self,
        items: list[dict],
        report: IndexReport,
        batch_size: int,
        num_workers: int | None,
        progress: bool,
        stale: list[str],
    ) -> bool:
        import torch
        from tqdm.auto import tqdm

        from placerank.data.images import make_loader

        model, device = self.model, self.device
        loader = make_loader(
            [it["path"] for it in items], model.preprocess, batch_size, num_workers, pin_memory=device.type == "cuda"
        )
        bar = tqdm(total=len(items), desc=f"index ({model.name})", unit="img", leave=False, disable=not progress)
        committed = False
        with torch.inference_mode():
            for idx, images, sizes, errors in loader:
                ok = [j for j, err in enumerate(errors) if not err]
                for j, err in enumerate(errors):
                    if err:
                        it = items[int(idx[j])]
                        report.failed.append((str(it["path"]), err))
                        if it["old_id"] is not None:
                            stale.append(str(it["path"]))
                if ok:
                    desc = model(images[ok].to(device, non_blocking=True)).float().cpu().numpy()
                    batch = []
                    for row, j in enumerate(ok):
                        it = items[int(idx[j])]
                        it["desc"] = desc[row]
                        it["hw"] = (int(sizes[j][0]), int(sizes[j][1]))
                        batch.append(it)
                    self._commit_items(batch, report)
                    report.extracted += len(batch)
                    committed = True
                bar.update(len(idx))
        bar.close()
        return committed

    # -- local features --------------------------------------------------------------------------
    def _reranker(self, name: str, options: dict | None):
        key = (name, json.dumps(options or {}, sort_keys=True, default=str))
        if key not in self._rerankers:
            from placerank.rerank.base import create_reranker

            self._rerankers[key] = create_reranker(name, model=self.model, **(options or {})).to(self.device)
        return self._rerankers[key]

    def _store_folder(self, reranker) -> Path:
        from placerank.descriptors.cache import namespace

        return self.folder / "local" / namespace(reranker.name, reranker.signature())

    def _local_store(self, reranker, create: bool):
        from placerank.descriptors.local_store import LocalFeatureStore

        folder = self._store_folder(reranker)
        if not create and not (folder / "meta.json").exists():
            return None
        return LocalFeatureStore(folder, reranker.signature(), reranker.dim)

    def _store_local_features(self, name, options, report, num_workers, progress, say) -> int:
        import torch
        from tqdm.auto import tqdm

        from placerank.data.images import make_loader

        reranker = self._reranker(name, options)
        store = self._local_store(reranker, create=True)
        try:
            need: dict[str, str] = {}
            for path, sha in self._conn.execute("SELECT path, sha256 FROM images ORDER BY id"):
                if sha not in need and sha not in store:
                    need[sha] = path
            done = 0
            if need:
                say(f"extracting local features ({reranker.name}) for {len(need)} photo(s)")
                shas, paths = list(need), list(need.values())
                loader = make_loader(paths, reranker.preprocess, 8, num_workers, pin_memory=self.device.type == "cuda")
                bar = tqdm(
                    total=len(paths), desc=f"local ({reranker.name})", unit="img", leave=False, disable=not progress
                )
                with torch.inference_mode():
                    for idx, images, sizes, errors in loader:
                        ok = [j for j, err in enumerate(errors) if not err]
                        for j, err in enumerate(errors):
                            if err:
                                report.failed.append((paths[int(idx[j])], err))
                        if ok:
                            feats = reranker.extract(
                                images[ok].to(self.device), [tuple(int(v) for v in sizes[j]) for j in ok]
                            )
                            store.add_many([(shas[int(idx[j])], f) for j, f in zip(ok, feats)])
                            done += len(ok)
                        bar.update(len(idx))
                bar.close()
            rr = json.loads(self._meta_get("rerankers") or "{}")
            if rr.get(reranker.name) != reranker.signature():
                rr[reranker.name] = reranker.signature()
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("UPDATE meta SET value=? WHERE key='rerankers'", (json.dumps(rr),))
                self._conn.execute("COMMIT")
            return done
        finally:
            store.close()

    # -- removing photos -------------------------------------------------------------------------
    def remove(self, paths: Sequence[str | Path], wait: float = 0.0) -> RemoveReport:
        """Drop photos (or every photo under a folder) from the database. The photos themselves
        are not touched. Their local features stay in the store (keyed by content) until the
        database is rebuilt."""
        report = RemoveReport()
        with self._writing(wait):
            self._ensure_index()
            known = [r[0] for r in self._conn.execute("SELECT path FROM images")]
            targets: list[str] = []
            for raw in paths:
                p = Path(raw).expanduser().resolve()
                hits = [k for k in known if k == str(p) or _is_under(Path(k), p)]
                if not hits:
                    report.not_found.append(str(raw))
                targets.extend(h for h in hits if h not in targets)
            if targets:
                try:
                    report.removed = self._remove_rows(targets)
                finally:
                    self._save_index()
        if report.not_found and not report.removed:
            raise DataError(
                f"{report.not_found[0]}: not in the database {self.folder}"
                + (f" (nor {len(report.not_found) - 1} other path(s))" if len(report.not_found) > 1 else "")
            )
        return report

    def _remove_rows(self, paths: list[str]) -> list[str]:
        ids = []
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for p in paths:
                row = self._conn.execute("SELECT id FROM images WHERE path=?", (p,)).fetchone()
                if row is not None:
                    ids.append(row[0])
                    self._conn.execute("DELETE FROM images WHERE id=?", (row[0],))
            gen = self._bump_generation()
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        if ids:
            self._index.remove_ids(np.array(ids, dtype=np.int64))
        self._index_gen = gen
        return paths

    # -- localizing ------------------------------------------------------------------------------
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
        import torch

        from placerank.data.images import load_tensor

        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        notes: list[str] = []
        path = Path(image)
        if top_k < 1:
            raise PlaceRankError(f"--top-k must be >= 1, got {top_k}")
        model = self.model
        index = self._ensure_index()
        if index.ntotal == 0:
            raise PlaceRankError(f"{self.folder}: the database is empty; index photos first")
        tensor, _ = load_tensor(path, model.preprocess)
        with torch.inference_mode():
            q = model(tensor[None].to(self.device)).float().cpu().numpy()
        timing["describe"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        sims, ids = index.search(q, min(int(top_k), int(index.ntotal)))
        cand_ids = [int(i) for i in ids[0] if i >= 0]
        cand_sims = [float(s) for s, i in zip(sims[0], ids[0]) if i >= 0]
        marks = ",".join("?" * len(cand_ids))
        rows = (
            {r[0]: r for r in self._conn.execute(f"SELECT {_ROW_COLS} FROM images WHERE id IN ({marks})", cand_ids)}
            if cand_ids
            else {}
        )
        keep = [j for j, i in enumerate(cand_ids) if i in rows]  # a concurrent writer may just have removed one
        cand_ids = [cand_ids[j] for j in keep]
        cand_sims = np.array([cand_sims[j] for j in keep], dtype=np.float64)
        timing["search"] = time.perf_counter() - t1

        rerank_scores = None
        extras: dict = {}
        if rerank:
            t2 = time.perf_counter()
            order, rerank_scores, extras = self._rerank(
                path, [rows[i] for i in cand_ids], rerank, rerank_options, notes
            )
            cand_ids = [cand_ids[j] for j in order]
            cand_sims = cand_sims[order]
            rerank_scores = rerank_scores[order]
            timing["rerank"] = time.perf_counter() - t2

        cand = [rows[i] for i in cand_ids]
        cfg = estimate or EstimateConfig(radius=float(radius) if radius is not None else self.radius)
        if radius is not None:
            cfg = EstimateConfig(**{**asdict(cfg), "radius": float(radius)})
        frame = self.frame or LOCAL
        ref_epsg = next((r[7] for r in cand if r[7] is not None), None)
        pos = _common_frame(cand, ref_epsg)
        mode = "rerank" if rerank_scores is not None else "similarity"
        est = estimate_position(pos, rerank_scores if rerank_scores is not None else cand_sims, mode, cfg)
        if mode == "rerank" and est.position is None and np.isfinite(pos).all(axis=1).any():
            notes.append("the re-ranker found no geometric evidence for any candidate; estimate from global similarity")
            est = estimate_position(pos, cand_sims, "similarity", cfg)
        lat = lon = east = north = None
        if est.position is not None:
            east, north = (float(v) for v in est.position)
            if ref_epsg is not None:
                lat, lon = (float(v) for v in unproject(est.position[None], ref_epsg)[0])
        matches = []
        for k, r in enumerate(cand):
            dist = (
                float(np.linalg.norm(pos[k] - est.position))
                if est.position is not None and np.isfinite(pos[k]).all()
                else None
            )
            matches.append(
                Match(
                    rank=k + 1,
                    path=r[1],
                    similarity=round(float(cand_sims[k]), 6),
                    rerank_score=None if rerank_scores is None else float(rerank_scores[k]),
                    weight=round(float(est.weights[k]), 6),
                    agrees=bool(est.agrees[k]),
                    distance_m=None if dist is None else round(dist, 3),
                    lat=r[3],
                    lon=r[4],
                    easting=r[5],
                    northing=r[6],
                    utm_zone=utm_label(r[7]),
                )
            )
        query_gps = None
        if frame == WGS84:
            try:
                g = read_gps(path)
            except DataError as e:
                g = None
                notes.append(f"query EXIF not used: {e}")
            if isinstance(g, GpsReading):
                err = None
                if ref_epsg is not None and est.position is not None:
                    g_en = project_latlon(np.array([[g.lat, g.lon]]), ref_epsg)[0]
                    extras["query_gps_en"] = g_en
                    err = round(float(np.linalg.norm(g_en - est.position)), 3)
                query_gps = QueryGps(lat=g.lat, lon=g.lon, error_m=err)
        if est.position is None:
            notes.append("no top match has a position: no estimate")
        timing["total"] = time.perf_counter() - t0
        extras.update({"positions": pos, "ref_epsg": ref_epsg})
        return LocalizeResult(
            query=str(path.resolve()),
            frame=frame,
            lat=lat,
            lon=lon,
            easting=east,
            northing=north,
            utm_zone=utm_label(ref_epsg) if est.position is not None else "",
            confidence=round(est.confidence, 4),
            share=round(est.share, 4),
            margin=None if est.margin is None else round(est.margin, 4),
            margin_factor=round(est.margin_factor, 4),
            radius_m=cfg.radius,
            matches=matches,
            model=model.name,
            weights_id=model.weights_id,
            rerank=rerank,
            database=str(self.folder),
            database_size=int(index.ntotal),
            query_gps=query_gps,
            timing_s={k: round(v, 4) for k, v in timing.items()},
            notes=notes,
            extras=extras,
        )

    def localize_many(self, images: Sequence[str | Path], **kwargs) -> list[LocalizeResult]:
        return [self.localize(p, **kwargs) for p in images]

    def _rerank(self, query: Path, cand_rows: list, name: str, options: dict | None, notes: list[str]):
        from placerank.data.images import load_tensor
        from placerank.rerank.base import rerank_order

        reranker = self._reranker(name, options)
        t, orig = load_tensor(query, reranker.preprocess)
        qlf = reranker.extract(t[None].to(self.device), [orig])[0]
        store = self._local_store(reranker, create=False)
        feats = []
        on_the_fly = 0
        try:
            for r in cand_rows:
                if store is not None and r[2] in store:
                    feats.append(store.get(r[2]))
                else:
                    ct, corig = load_tensor(r[1], reranker.preprocess)
                    feats.append(reranker.extract(ct[None].to(self.device), [corig])[0])
                    on_the_fly += 1
        finally:
            if store is not None:
                store.close()
        if on_the_fly:
            notes.append(
                f"{on_the_fly} candidate(s) had no stored {reranker.name} features and were extracted now "
                f"(index with --rerank {name} to store them)"
            )
        scores = np.asarray(reranker.score(qlf, feats), dtype=np.float64)
        order = rerank_order(scores)
        extras = {"reranker": reranker, "query_lf": qlf, "cand_lf": [feats[j] for j in order]}
        return order, scores, extras

    def positions(self, epsg: int | None = None) -> np.ndarray:
        """(N,2) metres of every database photo with a position: in ``epsg`` (a UTM zone) for a
        WGS84 database, else the local frame. For maps."""
        if epsg is None:
            rows = self._conn.execute("SELECT easting, northing FROM images WHERE easting IS NOT NULL").fetchall()
            return np.array(rows, dtype=np.float64).reshape(-1, 2)
        rows = self._conn.execute("SELECT lat, lon FROM images WHERE lat IS NOT NULL").fetchall()
        if not rows:
            return np.zeros((0, 2))
        return project_latlon(np.array(rows, dtype=np.float64), epsg)


def _is_initialised(folder: Path) -> bool:
    """True when ``folder`` holds a database with its metadata (an empty or half-created SQLite
    file, e.g. from a crash during creation, counts as no database)."""
    path = folder / DB_FILE
    if not path.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            return con.execute("SELECT 1 FROM meta WHERE key='format'").fetchone() is not None
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return False
        raise PlaceRankError(f"{path}: not a readable placerank database ({e})") from None
    except sqlite3.DatabaseError as e:
        raise PlaceRankError(f"{path}: not a readable placerank database ({e})") from None


def _not_an_image(path: Path) -> str | None:
    """The one-line reason ``path`` is not a readable image (header check only), else None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"{path}: cannot read image ({type(e).__name__}: {e})"
    return None


_POS_UPDATE = "UPDATE images SET lat=?, lon=?, easting=?, northing=?, epsg=?, position_source=? WHERE id=?"


def _pos_values(pos: Position) -> tuple:
    return (pos.lat, pos.lon, pos.easting, pos.northing, pos.epsg)


def _same_position(row, pos: Position) -> bool:
    """``row``: (path, id, sha, mtime, size, lat, lon, easting, northing, epsg)."""
    if row[7] is None:
        return False
    return abs(row[7] - pos.easting) < 1e-3 and abs(row[8] - pos.northing) < 1e-3 and row[9] == pos.epsg


def _frame_error(folder: Path, db_frame: str, new_frame: str, path: Path) -> str:
    names = {WGS84: "GPS (lat/lon, UTM)", LOCAL: "a local metric frame (easting/northing without a UTM zone)"}
    return (
        f"{folder}: the database holds positions in {names[db_frame]}, but {path} has a position in "
        f"{names[new_frame]}; use a separate --db"
    )


def _common_frame(rows: list, ref_epsg: int | None) -> np.ndarray:
    """(K,2) candidate positions in metres in one frame: the best candidate's UTM zone (lat/lon
    projected with pyproj, so neighbours across a zone border stay correct) or the local frame.
    NaN rows for candidates without a position."""
    out = np.full((len(rows), 2), np.nan)
    for k, r in enumerate(rows):
        lat, lon, e, n, epsg = r[3], r[4], r[5], r[6], r[7]
        if e is None:
            continue
        if ref_epsg is None or epsg == ref_epsg:
            out[k] = (e, n)
        elif lat is not None:
            out[k] = project_latlon(np.array([[lat, lon]]), ref_epsg)[0]
    return out
