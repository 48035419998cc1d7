"""``localize --sequence-length L``: photos are the frames of a traversal, matched as a sequence.

The photos are taken in the order given (a folder: sorted file names); a photo from another
folder than the previous one starts a new traversal. The database's order is its photos' paths
sorted by name, one traversal per folder (``placerank index`` of a folder of frames). Each photo
is searched as usual; its candidate list (global similarities, or a re-ranker's scores on that
scale, :func:`~placerank.rerank.sequence.frame_scores`) joins the last ``L - 1`` photos' lists,
and :func:`~placerank.rerank.sequence.sequence_match` scores the newest photo along
constant-velocity paths through the ordered database. See ``docs/sequence.md``.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from placerank.data.sequences import FrameOrder
from placerank.localize.store import Store
from placerank.rerank.sequence import SequenceOptions, sequence_match


class SequenceTracker:
    """The database's traversal order and the last ``L - 1`` photos' candidate lists."""

    def __init__(self, store: Store, options: SequenceOptions):
        self.options = options
        files = store.images.files()
        paths = sorted(files, key=lambda p: (str(Path(p).parent), Path(p).name))
        self.row_ids = np.array([files[p].id for p in paths], dtype=np.int64)
        self.position = {int(r): k for k, r in enumerate(self.row_ids)}
        self.order = FrameOrder.from_keys(
            np.arange(len(paths)), [str(Path(p).parent) for p in paths], "database paths sorted by name"
        )
        self.frames: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=options.length)
        self.folder: Path | None = None

    @property
    def candidates(self) -> int:
        return self.options.candidates

    def step(
        self, photo: Path, row_ids: np.ndarray, scores: np.ndarray, depth: int
    ) -> tuple[list[int], np.ndarray, int]:
        """Add ``photo``'s candidates (database row ids, per-frame scores best first) and return
        the best ``depth`` row ids by sequence score, their scores, and the frames used."""
        folder = Path(photo).resolve().parent
        if folder != self.folder:
            self.frames.clear()  # a new traversal: paths never span two
            self.folder = folder
        pos = np.array([self.position.get(int(r), -1) for r in row_ids], dtype=np.int64)
        s = np.asarray(scores, dtype=np.float64)[pos >= 0]
        self.frames.append((pos[pos >= 0], s))
        k = max(1, max(len(p) for p, _ in self.frames))
        ids = np.full((len(self.frames), k), -1, dtype=np.int64)
        sc = np.zeros((len(self.frames), k), dtype=np.float64)
        for i, (p, v) in enumerate(self.frames):
            ids[i, : len(p)], sc[i, : len(v)] = p, v
        n = len(self.frames)
        q_order = FrameOrder.from_keys(np.arange(n), [0] * n, "photos in the order given")
        m = sequence_match(ids, sc, q_order, self.order, self.options, depth, progress=False, queries=np.array([n - 1]))
        keep = m.ids[0] >= 0
        return [int(self.row_ids[j]) for j in m.ids[0][keep]], m.scores[0][keep], int(m.frames[0])
