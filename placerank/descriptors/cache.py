"""Descriptor cache: global descriptors on disk, keyed by model name, weights hash,
preprocessing and image path + mtime + size.

One SQLite file per (model, weights, preprocessing) namespace under ``$PLACERANK_CACHE``
(default ``~/.cache/placerank``). Each extracted batch is committed in one transaction, so a
second run re-extracts nothing, an interrupted run resumes after the last finished batch, and a
changed image (new mtime or size) is extracted again.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

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


class DescriptorCache:
    def __init__(self, name: str, dim: int, root: str | Path | None = None):
        self.dim = int(dim)
        self.folder = Path(root) if root is not None else cache_root() / "descriptors"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{name}.sqlite"
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS desc (key TEXT PRIMARY KEY, vec BLOB)")
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            q = f"SELECT key, vec FROM desc WHERE key IN ({','.join('?' * len(chunk))})"
            for k, blob in self._db.execute(q, chunk):
                v = np.frombuffer(blob, dtype=np.float32)
                if v.size == self.dim:
                    out[k] = v
        return out

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        rows = [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items]
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO desc VALUES (?, ?)", rows)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM desc").fetchone()[0]

    def close(self) -> None:
        self._db.close()
