"""Descriptor cache: global descriptors on disk, keyed by model name, weights hash,
preprocessing and image path + mtime + size.

One SQLite file per (model, weights, preprocessing) namespace under ``$PLACERANK_CACHE``
(default ``~/.cache/placerank``). Each extracted batch is committed in one transaction, so a
second run re-extracts nothing, an interrupted run resumes after the last finished batch, and a
changed image (new mtime or size) is extracted again.

Integrity (cache format 2): each row carries ``sum``, a BLAKE2b digest of its key and bytes; a row
whose bytes do not match it is treated as missing and re-extracted, never used. Rows written
before checksums existed (format 1, no ``sum``) are treated the same way: the cache upgrades in
place as they are re-extracted. A file SQLite cannot read is moved aside
(``NAME.sqlite.corrupt-TIME``) and rebuilt; a cache that cannot be written (read-only file or
folder) is read only, or skipped when it cannot be read either. Each of these prints one
``placerank: warning: ...`` line. A full disk while writing is a one-line error.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from placerank.errors import sqlite_write_error, warn
from placerank.utils import cache_root


def image_key(path: str | os.PathLike) -> str:
    """Identity of an image file's current content: absolute path + mtime (ns) + size."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha1(f"{p}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()


def namespace(*parts: str) -> str:
    readable = "-".join(p.replace("/", "_").replace(":", "_")[:40] for p in parts[:1])
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
    return f"{readable}-{digest}"


def checksum(key: str, blob: bytes) -> str:
    return hashlib.blake2b(key.encode() + b"|" + blob, digest_size=16).hexdigest()


class DescriptorCache:
    """``key -> float32 vector`` rows with a checksum each; see the module docstring."""

    def __init__(self, name: str, dim: int, root: str | Path | None = None):
        self.dim = int(dim)
        self.folder = Path(root) if root is not None else cache_root() / "descriptors"
        self.path = self.folder / f"{name}.sqlite"
        self.writable = True
        self._db: sqlite3.Connection | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            if not _is_corrupt(e):
                self._open_read_only(sqlite_write_error(e, self.path) or e)
                return
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            os.replace(self.path, aside)
            warn(f"descriptor cache {self.path} was corrupt ({e}); moved it to {aside.name} and rebuilding it")
            self._db = self._open()
        except OSError as e:
            self._open_read_only(e)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS desc (key TEXT PRIMARY KEY, vec BLOB, sum TEXT)")
            if "sum" not in {row[1] for row in db.execute("PRAGMA table_info(desc)")}:
                db.execute("ALTER TABLE desc ADD COLUMN sum TEXT")  # format 1 -> 2, rows re-extracted
            db.execute("SELECT COUNT(*) FROM desc").fetchone()
            db.commit()
        except BaseException:
            db.close()
            raise
        return db

    def _open_read_only(self, why: Exception) -> None:
        self.writable = False
        if self.path.is_file():
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60)
                db.execute("SELECT key, vec, sum FROM desc LIMIT 1").fetchall()
                self._db = db
                warn(f"descriptor cache {self.path} is not writable ({why}); using it read-only")
                return
            except sqlite3.Error:
                pass
        warn(f"descriptor cache {self.path} cannot be used ({why}); extracting without it (see $PLACERANK_CACHE)")

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors of ``keys`` that are present, of the right size and intact."""
        out: dict[str, np.ndarray] = {}
        if self._db is None:
            return out
        altered = 0
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            q = f"SELECT key, vec, sum FROM desc WHERE key IN ({','.join('?' * len(chunk))})"
            for k, blob, digest in self._db.execute(q, chunk):
                if digest is None:
                    continue  # written before checksums: re-extracted (and then checksummed)
                if not isinstance(blob, bytes) or digest != checksum(k, blob):
                    altered += 1
                    continue
                v = np.frombuffer(blob, dtype=np.float32)
                if v.size == self.dim:
                    out[k] = v
        if altered:
            warn(
                f"descriptor cache {self.path}: {altered} entr{'y' if altered == 1 else 'ies'} failed the checksum; re-extracting"
            )
        return out

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        if self._db is None or not self.writable:
            return
        rows = []
        for k, v in items:
            blob = np.ascontiguousarray(v, dtype=np.float32).tobytes()
            rows.append((k, blob, checksum(k, blob)))
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO desc (key, vec, sum) VALUES (?, ?, ?)", rows)
        except sqlite3.OperationalError as e:
            text = str(e).lower()
            full = sqlite_write_error(e, self.path)
            if full is not None:
                raise full from e
            if "readonly" in text or "read-only" in text:
                self.writable = False
                warn(f"descriptor cache {self.path} became read-only ({e}); not caching further descriptors")
                return
            raise

    def __len__(self) -> int:
        if self._db is None:
            return 0
        return self._db.execute("SELECT COUNT(*) FROM desc").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _is_corrupt(e: sqlite3.DatabaseError) -> bool:
    """SQLite cannot read the file (as opposed to: it may not write it)."""
    text = str(e).lower()
    return "not a database" in text or "malformed" in text or "corrupt" in text
