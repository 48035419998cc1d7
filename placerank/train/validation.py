"""Validation during training: a held-aside database/query pair that picks the best epoch.

Split out of :mod:`placerank.train.common` (which re-exports both names) so the shared training
plumbing there stays short: :class:`ValidationSet` measures recall on the pair, and
:class:`EpochSelector` turns those measurements into model selection and early stopping for a
step loop. Every method that validates (FoL, SelaVPR, SFRS) uses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from placerank.data.dataset import Dataset
from placerank.data.places import keep_frames
from placerank.errors import DataError, PlaceRankError


@dataclass
class ValidationSet:
    """A database/query pair the trainer evaluates after every epoch; the epoch with the best
    Recall@``select_n`` (ties: the better R@1, then R@5, then the earlier epoch) becomes ``model.pt``.

    Why: the CPU recipes train on a few hundred images, and recall on unseen frames peaks and
    then slips as the model over-fits. The official code also picks its released models by
    validation R@5: SelaVPR on the **re-ranked** R@5 with patience 3 (``--method selavpr``
    passes ``rerank`` to :meth:`recall`), SFRS on the global R@5. Here the validation frames are
    never the test frames.
    """

    dataset: Dataset
    select_n: int = 5

    @classmethod
    def from_options(
        cls,
        database: str,
        queries: str,
        frame_tolerance: int = -1,
        radius: float = -1.0,
        select_n: int = 5,
        frames: tuple[int, ...] = (),
    ) -> ValidationSet | None:
        """``None`` when no pair is configured; both or neither of database/queries.
        ``frames=(a, b)`` keeps frames a <= k < b of both sides (e.g. two traversal folders)."""
        if not database and not queries:
            return None
        if not (database and queries):
            raise PlaceRankError("validation needs both val_database and val_queries")
        if frames and len(frames) != 2:
            raise PlaceRankError(f"validation frames need START,STOP, got {','.join(map(str, frames))}")
        from placerank.data.readers import load_dataset

        ds = load_dataset(
            database,
            queries,
            radius=radius if radius >= 0 else None,
            frame_tolerance=frame_tolerance if frame_tolerance >= 0 else None,
        )
        ds = keep_frames(ds, (frames[0], frames[1]) if frames else None)
        if not any(len(p) for p in ds.positives):
            raise DataError(f"validation pair {database} / {queries}: no query has a positive in the database")
        return cls(ds, select_n)

    def recall(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        rerank: Callable[[np.ndarray], np.ndarray] | None = None,
        top_k: int = 100,
    ) -> dict[str, float]:
        """Recall@1/5/10 of L2-normalised descriptors by inner product (exact flat search in
        query chunks, as eval: no queries x database matrix).

        ``rerank`` (ids (Q, K) -> re-ordered ids): the first-stage top-``top_k`` candidates are
        re-ordered before recall is counted — the official SelaVPR selects its model on the
        re-ranked R@5 (spec selavpr.md §4.3); SFRS selects on the global recall."""
        from placerank.eval.recall import recall_at_n
        from placerank.index.flat import FlatIndex

        depth = min(max(10, top_k) if rerank is not None else 10, len(database))
        _, ids = FlatIndex.build(np.asarray(database, dtype=np.float32)).search(queries, depth)
        if rerank is not None:
            ids = rerank(ids)
        return recall_at_n(ids, self.dataset.positives, [n for n in (1, 5, 10) if n <= depth])

    def key(self, recall: dict[str, float]) -> tuple[float, float, float]:
        n = str(self.select_n) if str(self.select_n) in recall else max(recall, key=int)
        return recall[n], recall.get("1", 0.0), recall.get("5", 0.0)

    def improves(self, recall: dict[str, float], best: dict[str, float] | None) -> bool:
        return best is None or self.key(recall) > self.key(best)


class EpochSelector:
    """Validation-driven model selection for a step loop (FoL): validate every ``every_s``
    seconds of training (0: at every epoch end), keep the best recall's weights as ``model.pt``
    (``save(best)``), and tell the loop to stop after ``patience`` validations without
    improvement (0: never). Only the main process validates; the loop makes the stop decision
    collective. ``state()`` / ``load()`` go into the checkpoint so a resumed run keeps its best."""

    def __init__(self, val: ValidationSet | None, patience: int = 0, every_s: float = 0.0, log=None):
        self.val = val
        self.patience = patience
        self.every_s = every_s
        self.log = log or (lambda record: None)
        self.best: dict | None = None
        self.not_improved = 0
        self.last = time.monotonic()
        self.last_step = -1

    @classmethod
    def from_options(cls, o, max_minutes: float | None, main: bool, log) -> EpochSelector:
        """From a method's ``val_*`` options (``val_every_minutes`` -1: ``max_minutes`` / 10, or
        every epoch without a time limit); only the main process gets the validation pair."""
        val = ValidationSet.from_options(
            o.val_database, o.val_queries, o.val_frame_tolerance, o.val_radius, o.val_select_n, o.val_frames
        )
        every = o.val_every_minutes if o.val_every_minutes >= 0 else (max_minutes or 0.0) / 10
        return cls(val if main else None, o.val_patience, 60.0 * every, log)

    def state(self) -> dict:
        return {"best": self.best, "not_improved": self.not_improved}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.not_improved = state.get("best"), int(state.get("not_improved", 0))

    def due(self, epoch_end: bool) -> bool:
        """Time to validate: at an epoch end when validating per epoch, else every ``every_s``."""
        if self.val is None:
            return False
        return epoch_end if self.every_s <= 0 else time.monotonic() - self.last >= self.every_s

    def pending(self, step: int) -> bool:
        """Steps were trained since the last validation (validate once more before stopping)."""
        return self.val is not None and self.last_step != step

    @property
    def should_stop(self) -> bool:
        return self.val is not None and self.patience > 0 and self.not_improved >= self.patience

    def validate(self, model, device: torch.device, where: dict, save: Callable[[dict], None]) -> dict | None:
        """Recall of ``model``'s global descriptors on the validation pair (eval mode, no cache:
        the weights change every step); ``save(best)`` when it improves on the best so far."""
        from placerank.descriptors.extract import extract_features

        if self.val is None:
            return None
        was_training = model.training
        model.eval()
        ds = self.val.dataset
        paths = list(ds.database.paths) + list(ds.queries.paths)
        desc, _ = extract_features(model, paths, device, batch_size=8, num_workers=0, use_cache=False, progress=False)
        model.train(was_training)
        recall = self.val.recall(desc[: len(ds.database)], desc[len(ds.database) :])
        improved = self.val.improves(recall, None if self.best is None else self.best["recall"])
        if improved:
            self.best, self.not_improved = {**where, "recall": recall}, 0
            save(self.best)
        else:
            self.not_improved += 1
        self.log(
            {"event": "validation", **where, "recall": recall, "improved": improved, "not_improved": self.not_improved}
        )
        self.last, self.last_step = time.monotonic(), int(where.get("step", -1))
        return recall
