"""The localize database's SQLite file ``DB/placerank.sqlite``: metadata, photo rows and their
descriptors (the source of truth; the FAISS index is derived from it).

WAL mode, ``synchronous=FULL``. A ``meta`` table (format, model name, weights hash = the
parameter hash the descriptor cache also uses, weights file, preprocessing, position frame,
default radius, re-rankers, *generation*) and an ``images`` table (absolute path, sha256, mtime,
size, lat/lon, UTM easting/northing + EPSG zone, where the position came from, the float32 global
descriptor). Every change is one transaction that also increments ``generation``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from placerank.data.positions import Position, project_latlon
from placerank.errors import PlaceRankError

FORMAT = 1
DB_FILE = "placerank.sqlite"

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


class Row(NamedTuple):
    """A database photo as localize sees it."""

    id: int
    path: str
    sha256: str
    lat: float | None
    lon: float | None
    easting: float | None
    northing: float | None
    epsg: int | None


class FileRow(NamedTuple):
    """A database photo as ``index`` sees it (to decide what changed on disk)."""

    path: str
    id: int
    sha256: str
    mtime_ns: int
    size: int
    easting: float | None
    northing: float | None
    epsg: int | None

    def same_position(self, pos: Position) -> bool:
        if self.easting is None or self.northing is None:
            return False
        return (
            abs(self.easting - pos.easting) < 1e-3
            and abs(self.northing - pos.northing) < 1e-3
            and self.epsg == pos.epsg
        )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_initialised(folder: Path) -> bool:
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


def connect(folder: Path, read_only: bool = False) -> sqlite3.Connection:
    """The database's connection; ``read_only``: SQLite's ``mode=ro`` (every write is refused)."""
    try:
        if read_only:
            conn = sqlite3.connect(f"file:{folder / DB_FILE}?mode=ro", uri=True, timeout=60, isolation_level=None)
        else:
            conn = sqlite3.connect(folder / DB_FILE, timeout=60, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.DatabaseError as e:
        from placerank.errors import sqlite_write_error

        full = None if read_only else sqlite_write_error(e, folder / DB_FILE)
        if full is not None:
            raise full from None
        raise PlaceRankError(f"{folder / DB_FILE}: not a readable placerank database ({e})") from None
    return conn


def create(folder: Path, meta: dict[str, str]) -> sqlite3.Connection:
    """Schema and metadata in one transaction: a crash here leaves no half-made database."""
    conn = connect(folder)
    with Metadata(conn).transaction():
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
    return conn


def _write_error(conn: sqlite3.Connection, e: sqlite3.OperationalError) -> Exception:
    """A full disk (or file-size limit) as the one-line error naming the database file."""
    from placerank.errors import sqlite_write_error

    try:
        path = conn.execute("PRAGMA database_list").fetchone()[2]
    except sqlite3.Error:
        path = DB_FILE
    return sqlite_write_error(e, path) or e


class Metadata:
    """The ``meta`` table and the transactions every change goes through."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def all(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def get(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else ""

    def set(self, key: str, value: str) -> None:
        """Inside a :meth:`transaction`."""
        self.conn.execute("UPDATE meta SET value=? WHERE key=?", (value, key))

    @property
    def generation(self) -> int:
        return int(self.get("generation") or 0)

    def bump_generation(self) -> int:
        """Inside a :meth:`transaction`: the generation this change makes."""
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
        return self.generation

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield
            self.conn.execute("COMMIT")
        except BaseException as e:
            if self.conn.in_transaction:  # SQLite may have rolled back itself (disk full)
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            err = _write_error(self.conn, e) if isinstance(e, sqlite3.OperationalError) else e
            if err is not e:
                raise err from e
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One consistent read, even while another process writes."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")


_ROW_COLS = "id, path, sha256, lat, lon, easting, northing, epsg"
_FILE_COLS = "path, id, sha256, mtime_ns, size, easting, northing, epsg"


class Images:
    """The ``images`` table: one row per indexed photo, with its descriptor."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def count(self, with_position: bool = False) -> int:
        where = " WHERE easting IS NOT NULL" if with_position else ""
        return int(self.conn.execute(f"SELECT COUNT(*) FROM images{where}").fetchone()[0])

    def ids(self) -> np.ndarray:
        return np.array([r[0] for r in self.conn.execute("SELECT id FROM images ORDER BY id")], dtype=np.int64)

    def descriptor_chunks(self, size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, descriptors) in chunks of ``size`` rows, by id."""
        ids: list[int] = []
        vecs: list[np.ndarray] = []
        for row_id, blob in self.conn.execute("SELECT id, descriptor FROM images ORDER BY id"):
            ids.append(row_id)
            vecs.append(np.frombuffer(blob, dtype=np.float32))
            if len(ids) >= size:
                yield np.array(ids, dtype=np.int64), np.stack(vecs)
                ids, vecs = [], []
        if ids:
            yield np.array(ids, dtype=np.int64), np.stack(vecs)

    def rows(self, ids: list[int]) -> dict[int, Row]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return {r[0]: Row(*r) for r in self.conn.execute(f"SELECT {_ROW_COLS} FROM images WHERE id IN ({marks})", ids)}

    def files(self) -> dict[str, FileRow]:
        return {r[0]: FileRow(*r) for r in self.conn.execute(f"SELECT {_FILE_COLS} FROM images")}

    def contents(self) -> dict[str, str]:
        """sha256 -> the first path (by id) holding that content."""
        out: dict[str, str] = {}
        for path, sha in self.conn.execute("SELECT path, sha256 FROM images ORDER BY id"):
            out.setdefault(sha, path)
        return out

    def descriptor_of(self, sha256: str) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The stored descriptor and image (H, W) of any photo with this content."""
        hit = self.conn.execute(
            "SELECT descriptor, height, width FROM images WHERE sha256=? LIMIT 1", (sha256,)
        ).fetchone()
        return None if hit is None else (np.frombuffer(hit[0], dtype=np.float32), (hit[1], hit[2]))

    def insert(self, path: str, sha256: str, mtime_ns: int, size: int, pos: Position | None, source: str, hw, desc):
        """Inside a transaction; returns the new row id."""
        values = (pos.lat, pos.lon, pos.easting, pos.northing, pos.epsg) if pos is not None else (None,) * 5
        cur = self.conn.execute(
            "INSERT INTO images (path, sha256, mtime_ns, size, lat, lon, easting, northing, epsg, "
            "position_source, height, width, descriptor, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                path,
                sha256,
                mtime_ns,
                size,
                *values,
                source,
                hw[0],
                hw[1],
                np.ascontiguousarray(desc, dtype=np.float32).tobytes(),
                now(),
            ),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def delete_paths(self, paths: list[str]) -> list[int]:
        """Inside a transaction; the ids of the rows deleted."""
        ids = []
        for p in paths:
            row = self.conn.execute("SELECT id FROM images WHERE path=?", (p,)).fetchone()
            if row is not None:
                ids.append(int(row[0]))
                self.conn.execute("DELETE FROM images WHERE id=?", (row[0],))
        return ids

    def delete_ids(self, ids: list[int]) -> None:
        self.conn.executemany("DELETE FROM images WHERE id=?", [(i,) for i in ids])

    def set_file(self, row_id: int, mtime_ns: int, size: int) -> None:
        self.conn.execute("UPDATE images SET mtime_ns=?, size=? WHERE id=?", (mtime_ns, size, row_id))

    def set_position(self, row_id: int, pos: Position, source: str) -> None:
        self.conn.execute(
            "UPDATE images SET lat=?, lon=?, easting=?, northing=?, epsg=?, position_source=? WHERE id=?",
            (pos.lat, pos.lon, pos.easting, pos.northing, pos.epsg, source, row_id),
        )

    def positions(self, epsg: int | None = None) -> np.ndarray:
        """(N,2) metres of every photo with a position: in ``epsg`` (a UTM zone) for a WGS84
        database, else the stored (local-frame) easting/northing."""
        if epsg is None:
            rows = self.conn.execute("SELECT easting, northing FROM images WHERE easting IS NOT NULL").fetchall()
            return np.array(rows, dtype=np.float64).reshape(-1, 2)
        rows = self.conn.execute("SELECT lat, lon FROM images WHERE lat IS NOT NULL").fetchall()
        if not rows:
            return np.zeros((0, 2))
        return project_latlon(np.array(rows, dtype=np.float64), epsg)
