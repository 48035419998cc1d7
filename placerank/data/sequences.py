"""The order of an image set along its traversals, for sequence matching.

Sequence matching (:mod:`placerank.rerank.sequence`) needs two things of each side: which image
came before which (the traversal order) and where one traversal ends and the next begins (a path
must never run across two sequences). Both are read from what the data already says, never
guessed from image content:

| the image set came from | order | sequences |
| --- | --- | --- |
| a frame-aligned folder (``--layout frames``) or any plain folder | sorted file names (the reader's order) | one per sub-folder |
| a CSV with a ``frame`` or ``timestamp`` column | that column (numbers, or ISO 8601 times) | the ``sequence`` / ``sequence_id`` / ``sequence_key`` column, else one |
| MSLS (``<side>/images/<key>.jpg``) | ``seq_info.csv`` ``frame_number`` | ``seq_info.csv`` ``sequence_key`` |

``@UTM@`` folders, CSVs with only positions or ``place_id`` and the other benchmark layouts carry
no order: :func:`frame_order` says so in one line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from placerank.data.dataset import ImageSet
from placerank.errors import DataError

ORDER_COLUMNS = ("frame", "timestamp")
SEQUENCE_COLUMNS = ("sequence", "sequence_id", "sequence_key")


@dataclass(frozen=True)
class FrameOrder:
    """``order``: image indices in traversal order, sequence after sequence; ``sequence``: the
    sequence number of each entry of ``order`` (non-decreasing); ``source``: where the order came
    from (for ``results.json``)."""

    order: np.ndarray
    sequence: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.order) != len(self.sequence):
            raise ValueError("order and sequence differ in length")

    def __len__(self) -> int:
        return len(self.order)

    @property
    def rank(self) -> np.ndarray:
        """``rank[i]``: the position of image ``i`` in :attr:`order`."""
        rank = np.empty(len(self.order), dtype=np.int64)
        rank[self.order] = np.arange(len(self.order), dtype=np.int64)
        return rank

    @property
    def num_sequences(self) -> int:
        return int(len(np.unique(self.sequence)))

    def history(self, length: int) -> np.ndarray:
        """(N, length) int64: row i = image i, then the images before it in its sequence, newest
        first; -1 where the sequence has fewer earlier images (its first frames)."""
        rank = self.rank
        out = np.full((len(self.order), length), -1, dtype=np.int64)
        for back in range(length):
            r = rank - back
            ok = r >= 0
            ok[ok] = self.sequence[r[ok]] == self.sequence[rank[ok]]
            out[ok, back] = self.order[r[ok]]
        return out

    def describe(self) -> dict:
        return {"order": self.source, "sequences": self.num_sequences, "images": len(self)}

    @classmethod
    def from_keys(cls, time_keys, sequence_keys, source: str) -> FrameOrder:
        """Sort by (sequence, time); sequences numbered in order of first appearance."""
        seq_ids: dict[object, int] = {}
        seq = np.array([seq_ids.setdefault(s, len(seq_ids)) for s in sequence_keys], dtype=np.int64)
        t = np.asarray(time_keys, dtype=np.float64)
        order = np.lexsort((np.arange(len(t)), t, seq)).astype(np.int64)
        return cls(order=order, sequence=seq[order], source=source)


def frame_order(images: ImageSet, side: str = "images") -> FrameOrder:
    """The traversal order of ``images`` (see the module docstring), or a one-line
    :class:`DataError` saying why this set has none."""
    if not len(images):
        raise DataError(f"{side}: no images to order")
    source = Path(images.source) if images.source else None
    msls = _msls_order(images, side)
    if msls is not None:
        return msls
    if source is not None and source.suffix.lower() == ".csv" and source.is_file():
        return _csv_order(images, source, side)
    if images.kind == "frame":
        folders = [str(p.parent) for p in images.paths]
        return FrameOrder.from_keys(images.positions, folders, "frame index")
    if source is not None and source.is_dir():
        if images.kind == "utm":
            raise DataError(
                f"{side}: {source} names images by position (@UTM@), not by time, so it has no frame order;"
                " give a CSV with a frame or timestamp column (or a frame-aligned folder with --layout frames)"
            )
        folders = [str(p.parent) for p in images.paths]
        return FrameOrder.from_keys(np.arange(len(images)), folders, "sorted file names")
    raise DataError(
        f"{side}: {images.source or 'this image set'} has no frame order (sequence matching needs a frame-aligned"
        " folder, a CSV with a frame or timestamp column, or MSLS seq_info.csv)"
    )


def _csv_order(images: ImageSet, csv_path: Path, side: str) -> FrameOrder:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    time_col = next((c for c in ORDER_COLUMNS if c in columns), None)
    if time_col is None:
        raise DataError(
            f"{side}: {csv_path} has no frame or timestamp column, so its images have no order for"
            f" --sequence-length (columns: {', '.join(columns)})"
        )
    seq_col = next((c for c in SEQUENCE_COLUMNS if c in columns), None)
    by_path = {(csv_path.parent / r.get("path", "")).resolve(): r for r in rows}
    times, seqs = [], []
    for p in images.paths:
        row = by_path.get(Path(p).resolve())
        if row is None:
            raise DataError(f"{side}: {p} is not listed in {csv_path}")
        times.append(_time_value(row[time_col], csv_path, time_col))
        seqs.append(row[seq_col] if seq_col else "")
    what = f"{csv_path.name} column '{time_col}'" + (f", sequences by '{seq_col}'" if seq_col else "")
    return FrameOrder.from_keys(times, seqs, what)


def _time_value(value: str, csv_path: Path, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise DataError(
            f"{csv_path}: '{value}' in column '{column}' is neither a number nor an ISO 8601 time"
        ) from None


def _msls_order(images: ImageSet, side: str) -> FrameOrder | None:
    """MSLS ``<side>/images/<key>.jpg`` with ``<side>/seq_info.csv``; None if not that layout."""
    sides = {p.parent.parent for p in images.paths if p.parent.name == "images"}
    if len(sides) == 0 or not all((s / "seq_info.csv").exists() for s in sides):
        return None
    if any(p.parent.name != "images" for p in images.paths):
        return None
    info: dict[tuple[Path, str], tuple[str, float]] = {}
    for s in sides:
        with open(s / "seq_info.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                row = {(k or "").strip(): (v or "").strip() for k, v in r.items()}
                try:
                    info[(s, row["key"])] = (row["sequence_key"], float(row["frame_number"]))
                except (KeyError, ValueError):
                    raise DataError(
                        f"{s / 'seq_info.csv'}: needs key, sequence_key and a numeric frame_number"
                    ) from None
    times, seqs = [], []
    for p in images.paths:
        found = info.get((p.parent.parent, p.stem))
        if found is None:
            raise DataError(f"{side}: {p.stem} is missing from {p.parent.parent / 'seq_info.csv'}")
        seqs.append((str(p.parent.parent), found[0]))
        times.append(found[1])
    return FrameOrder.from_keys(times, seqs, "MSLS seq_info.csv frame_number")
