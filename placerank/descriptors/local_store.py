"""On-disk local-feature store: float16 descriptors + float32 keypoints, memory-mapped,
read only for the candidates being re-ranked.

Layout of a store folder::

    meta.json        {"format": 1, "signature": ..., "dim": D}
    desc.f16         all descriptors, appended, float16, row-major (total_rows, D)
    kpts.f32         keypoints (total_rows, 2) float32 (x, y) in original-image pixels
    scores.f32       per-feature scores (total_rows,) float32 (1.0 where a method has none)
    index.sqlite     key -> (row offset, count, image H, W)

Appends write the arrays first and commit the index row last, in one SQLite transaction; an
interrupted run leaves at most some unreferenced bytes at the end of the arrays, never a
half-indexed image, and the next run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from placerank.errors import IndexMismatchError
from placerank.models.base import LocalFeatures
from placerank.utils import write_json_atomic

FORMAT = 1


class LocalFeatureStore:
    def __init__(self, folder: str | Path, signature: str, dim: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.signature = signature
        self.dim = int(dim)
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("signature") != signature or int(meta.get("dim", -1)) != self.dim:
                raise IndexMismatchError(
                    f"{self.folder}: local-feature store was built for '{meta.get('signature')}' "
                    f"({meta.get('dim')}-d), not '{signature}' ({self.dim}-d)"
                )
        else:
            write_json_atomic(meta_path, {"format": FORMAT, "signature": signature, "dim": self.dim})
        self._db = sqlite3.connect(self.folder / "index.sqlite", timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS feats (key TEXT PRIMARY KEY, row INTEGER, n INTEGER, h INTEGER, w INTEGER)"
        )
        self._db.commit()
        self._paths = {n: self.folder / n for n in ("desc.f16", "kpts.f32", "scores.f32")}
        self._maps: dict[str, np.ndarray] | None = None

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM feats WHERE key=?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM feats").fetchone()[0]

    def _rows_on_disk(self) -> int:
        p = self._paths["kpts.f32"]
        return p.stat().st_size // 8 if p.exists() else 0

    def add_many(self, items: list[tuple[str, LocalFeatures]]) -> None:
        """Append several images' features; committed together."""
        if not items:
            return
        row = self._rows_on_disk()
        # Truncate any unreferenced tail left by an interrupted append so rows stay aligned.
        for name, width in (("desc.f16", 2 * self.dim), ("kpts.f32", 8), ("scores.f32", 4)):
            p = self._paths[name]
            if p.exists() and p.stat().st_size != row * width:
                with open(p, "r+b") as f:
                    f.truncate(row * width)
        records = []
        with (
            open(self._paths["desc.f16"], "ab") as fd,
            open(self._paths["kpts.f32"], "ab") as fk,
            open(self._paths["scores.f32"], "ab") as fs,
        ):
            for key, lf in items:
                n = len(lf)
                desc = np.asarray(lf.descriptors, dtype=np.float16).reshape(n, self.dim)
                fd.write(desc.tobytes())
                fk.write(np.asarray(lf.keypoints, dtype=np.float32).reshape(n, 2).tobytes())
                sc = np.ones(n, np.float32) if lf.scores is None else np.asarray(lf.scores, dtype=np.float32)
                fs.write(sc.tobytes())
                records.append((key, row, n, int(lf.image_size[0]), int(lf.image_size[1])))
                row += n
            for written in (fd, fk, fs):
                written.flush()
                os.fsync(written.fileno())
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO feats VALUES (?,?,?,?,?)", records)
        self._maps = None

    def add(self, key: str, lf: LocalFeatures) -> None:
        self.add_many([(key, lf)])

    def _memmaps(self) -> dict[str, np.ndarray]:
        if self._maps is None:
            rows = self._rows_on_disk()
            self._maps = {
                "desc": np.memmap(self._paths["desc.f16"], np.float16, "r", shape=(rows, self.dim))
                if rows
                else np.zeros((0, self.dim), np.float16),
                "kpts": np.memmap(self._paths["kpts.f32"], np.float32, "r", shape=(rows, 2))
                if rows
                else np.zeros((0, 2), np.float32),
                "scores": np.memmap(self._paths["scores.f32"], np.float32, "r", shape=(rows,))
                if rows
                else np.zeros((0,), np.float32),
            }
        return self._maps

    def get(self, key: str) -> LocalFeatures:
        rec = self._db.execute("SELECT row, n, h, w FROM feats WHERE key=?", (key,)).fetchone()
        if rec is None:
            raise KeyError(key)
        row, n, h, w = rec
        m = self._memmaps()
        return LocalFeatures(
            keypoints=np.array(m["kpts"][row : row + n]),
            descriptors=np.array(m["desc"][row : row + n]),
            scores=np.array(m["scores"][row : row + n]),
            image_size=(h, w),
        )

    def bytes_per_image(self) -> float:
        """Average bytes of local data per stored image (descriptors + keypoints + scores)."""
        n_img = len(self)
        if n_img == 0:
            return 0.0
        rows = self._rows_on_disk()
        return rows * (2 * self.dim + 8 + 4) / n_img

    def close(self) -> None:
        self._db.close()
        self._maps = None
