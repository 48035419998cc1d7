"""SQLite rows and the FAISS index kept in step: every change is one SQLite transaction that
bumps the generation, then the same change in the in-memory index, which is saved (stamped with
that generation) by the writer at the end of its run. Readers take no lock: SQLite gives them a
consistent snapshot and, when the saved index is not the current generation's, they rebuild it in
memory (and save it when no writer is busy).

The index kind is the database's ``index`` metadata ("flat" unless ``placerank index --index SPEC``
set another, with ``index_options``). A kind that needs training is trained from the stored
descriptors when the index is rebuilt; while the database has fewer photos than it needs, the
index is flat (exact) and it is rebuilt with the kind once there are enough. A kind that cannot
remove rows (HNSW) is rebuilt from the stored descriptors after every change that removes rows."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placerank.data.positions import Position
from placerank.index.idmap import IdMapIndex, IdMapSchema, usable_spec
from placerank.localize.lock import WriterSlot
from placerank.localize.metadata import Images, Metadata


@dataclass
class NewPhoto:
    """A photo about to become a row: its file, content, position and descriptor."""

    path: Path
    sha: str
    mtime_ns: int
    size: int
    pos: Position | None
    source: str
    old_id: int | None  # the row it replaces (content changed), if any
    desc: np.ndarray | None = None
    hw: tuple[int, int] = (0, 0)


class Store:
    def __init__(self, folder: Path, conn: sqlite3.Connection):
        self.folder = folder
        self.meta = Metadata(conn)
        self.images = Images(conn)
        self.slot = WriterSlot(folder)
        self._index: IdMapIndex | None = None
        self._saved = -1  # generation of the index file on disk, as far as this object knows
        self.index_rebuilt = False  # True when the last index load had to rebuild from SQLite
        self.read_only = False  # True: a rebuilt index stays in memory (nothing is written)

    def index(self) -> IdMapIndex:
        """The in-memory index for the database's current generation (loaded, or rebuilt from
        the stored descriptors when the file is missing, stale or damaged)."""
        if self._index is not None and self._index.generation == self.meta.generation:
            return self._index
        m = self.meta
        with m.snapshot():
            ids = self.images.ids()
            dim, (spec, options) = int(m.get("descriptor_dim")), self.index_kind()
            use = usable_spec(spec, dim, len(ids))
            expected = IdMapSchema(
                dim, m.get("model"), m.get("weights_id"), len(ids), m.generation, spec=use,
                options=options if use == spec else {},
            )  # fmt: skip
            index, rebuilt = IdMapIndex.open(self.folder, expected, ids, self.images.descriptor_chunks)
        self._index, self.index_rebuilt = index, rebuilt
        self._saved = -1 if rebuilt else index.generation
        if rebuilt and not self.read_only:
            with self.slot.try_hold() as holding:
                if holding and self.meta.generation == index.generation:
                    self.save_index()
        return index

    def index_kind(self) -> tuple[str, dict]:
        """(spec, search options) the database asks for (docs/index.md)."""
        return self.meta.get("index") or "flat", json.loads(self.meta.get("index_options") or "{}")

    def change_index(self, spec: str | None, options: dict | None, wait: float = 0.0) -> None:
        """Search with an index of kind ``spec`` (None: keep the kind) and these search options
        (None: keep them for the same kind, none for a new kind); checked on an empty index first,
        then rebuilt (trained) and saved at once, not by every reader. A no-op when nothing changes."""
        old = self.index_kind()
        new = (spec or old[0], dict(options) if options is not None else (old[1] if (spec or old[0]) == old[0] else {}))
        if new == old:
            return
        IdMapIndex(int(self.meta.get("descriptor_dim")), spec=new[0], options=new[1])  # bad: fails, nothing changed
        with self.slot.hold(wait):
            with self.meta.transaction():
                for key, value in (("index", new[0]), ("index_options", json.dumps(new[1], sort_keys=True))):
                    self.meta.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                self.meta.bump_generation()
            self._index = None
            self.index()
            self.save_index()

    def _rebuild(self) -> IdMapIndex:
        """The index rebuilt from the stored rows (after a change the index kind cannot apply)."""
        self._index = None
        return self.index()

    def save_index(self) -> None:
        """By the writer, after its changes (also when interrupted); a no-op when unchanged. An
        index kept flat while the database was too small to train its kind is rebuilt first."""
        if self._index is not None:
            spec = self.index_kind()[0]
            if self._index.schema.spec != usable_spec(spec, self._index.schema.dimension, len(self._index)):
                self._rebuild()
        if self._index is not None and self._index.generation != self._saved:
            self._index.save(self.folder)
            self._saved = self._index.generation

    def add(self, photos: list[NewPhoto]) -> None:
        """One transaction for a batch of described photos, then the same change in the index."""
        index = self.index()
        new_ids: list[int] = []
        with self.meta.transaction():
            old_ids = [p.old_id for p in photos if p.old_id is not None]
            self.images.delete_ids(old_ids)
            for p in photos:
                new_ids.append(
                    self.images.insert(str(p.path), p.sha, p.mtime_ns, p.size, p.pos, p.source, p.hw, p.desc)
                )
            gen = self.meta.bump_generation()
        if not index.remove(old_ids):
            self._rebuild()  # the stored rows already hold this change
            return
        index.add(new_ids, np.stack([np.asarray(p.desc, dtype=np.float32) for p in photos]))
        index.generation = gen

    def remove(self, paths: list[str]) -> list[str]:
        """Drop the rows of ``paths`` (one transaction) and their index entries."""
        index = self.index()
        with self.meta.transaction():
            ids = self.images.delete_paths(paths)
            gen = self.meta.bump_generation()
        if not index.remove(ids):
            self._rebuild()
            return paths
        index.generation = gen
        return paths
