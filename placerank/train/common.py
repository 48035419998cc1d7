"""What every training method shares: the config, place-labelled data, a P x K sampler,
and a run folder with per-epoch resumable checkpoints and a JSON-lines loss log.

A method registers ``fn(config: TrainConfig) -> Path`` (returning ``RUN_DIR/model.pt``) with
:func:`register_method`; ``placerank train --method NAME`` calls it.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from placerank.data.dataset import Dataset, ImageSet
from placerank.data.places import keep_frames
from placerank.errors import DataError, PlaceRankError
from placerank.registry import Registry
from placerank.utils import atomic_path, write_json_atomic


@dataclass
class TrainConfig:
    method: str
    train: list[str]
    out: Path
    backbone: str = "effnet-lite0"
    epochs: int = 1
    max_minutes: float | None = None
    batch_places: int = 8  # P places per batch
    images_per_place: int = 2  # K images per place
    lr: float | None = None  # None: the method's default
    seed: int = 0
    image_size: tuple[int, int] | None = None
    frames: tuple[int, int] | None = None  # [start, stop) frame range used when training on traversals
    device: str = "auto"
    weights: str | None = None  # backbone weights (default: resolved like the models)
    resume: bool = True
    num_workers: int | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (train/precision.py); run_training resolves auto
    options: dict = field(default_factory=dict)  # method-specific key=value options

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# Modules of this package that hold shared or per-method helper code rather than a method.
HELPERS = (
    "auto_split",
    "common",
    "distributed",
    "losses",
    "precision",
    "selavpr_mining",
    "sfrs_data",
    "sfrs_features",
    "sfrs_mining",
    "sfrs_options",
    "sfrs_step",
)
METHODS: Registry = Registry("training method", "placerank.train", skip=HELPERS)


def register_method(name: str, description: str = "") -> Callable:
    return METHODS.register(name, description)


def list_methods() -> list[str]:
    return METHODS.names()


def run_training(config: TrainConfig) -> Path:
    """Run ``config.method``; ``config.precision`` is made concrete first (``auto`` -> the
    measured choice for the method on this device), so config.json records what ran."""
    from placerank.train.precision import resolve_train_precision
    from placerank.utils import resolve_device

    config.precision = resolve_train_precision(config.precision, config.method, resolve_device(config.device))
    return METHODS.create(config.method, config=config)


# ---------------------------------------------------------------------------------------------
# Place-labelled training data
# ---------------------------------------------------------------------------------------------


def place_groups(places: ImageSet, min_images: int = 2) -> list[np.ndarray]:
    """Indices of images per place, keeping places with at least ``min_images`` views."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(places.positions.tolist()):
        groups.setdefault(p, []).append(i)
    out = [np.array(v, dtype=np.int64) for k, v in sorted(groups.items(), key=lambda kv: kv[0]) if len(v) >= min_images]
    if not out:
        raise DataError(f"no place has {min_images} or more images: cannot form positive pairs")
    return out


class PlaceBatchSampler(torch.utils.data.Sampler):
    """GSV-Cities-style batches: P places x K images, ordered by place (image k of place p at
    position p*K + k), every place used once per epoch."""

    def __init__(self, groups: list[np.ndarray], places_per_batch: int, images_per_place: int, seed: int = 0):
        self.groups = groups
        self.P = places_per_batch
        self.K = images_per_place
        self.seed = seed
        self.epoch = 0
        if len(groups) < self.P:
            raise DataError(f"need at least {self.P} places with {self.K}+ images for a batch, found {len(groups)}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups) // self.P

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.groups))
        for b in range(len(self)):
            batch: list[int] = []
            for g in order[b * self.P : (b + 1) * self.P]:
                members = self.groups[g]
                pick = rng.choice(members, self.K, replace=len(members) < self.K)
                batch.extend(int(i) for i in pick)
            yield batch


class PlaceImageDataset(torch.utils.data.Dataset):
    """index -> (image tensor, integer place label)."""

    def __init__(self, places: ImageSet, preprocess, augment=None):
        from placerank.data.images import load_tensor

        self._load = load_tensor
        self.places = places
        self.pre = preprocess
        self.augment = augment
        uniq = {p: i for i, p in enumerate(sorted(set(places.positions.tolist())))}
        self.labels = np.array([uniq[p] for p in places.positions.tolist()], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, i: int):
        tensor, _ = self._load(self.places.paths[i], self.pre)
        if self.augment is not None:
            tensor = self.augment(tensor)
        return tensor, int(self.labels[i])


# ---------------------------------------------------------------------------------------------
# Validation: a held-aside database/query pair that picks the best epoch
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Run folder: checkpoints, resume, loss log
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global random generators (Python, NumPy, torch CPU and CUDA): saved in every checkpoint
    so a resumed run draws the same dropout masks and loader seeds as an uninterrupted one."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RunDir:
    """``RUN_DIR/config.json``, ``checkpoint.pt`` (latest, for resume), ``model.pt`` (a
    placerank checkpoint loadable with ``--weights``) and ``log.jsonl`` (one JSON per step/epoch).

    All writes are atomic; a run interrupted mid-epoch resumes from the last completed epoch.
    A checkpoint also holds the global random generators (:func:`rng_state`), restored when it is
    loaded: a resumed run ends with the same weights, bit for bit, as an uninterrupted one.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.path = Path(config.out)
        self.path.mkdir(parents=True, exist_ok=True)
        self.start_time = time.monotonic()
        cfg_path = self.path / "config.json"
        if cfg_path.exists() and config.resume:
            old = json.loads(cfg_path.read_text())
            if old.get("method") != config.method or old.get("backbone") != config.backbone:
                raise PlaceRankError(
                    f"{self.path}: run folder holds a '{old.get('method')}/{old.get('backbone')}' run; "
                    f"use another --out or --no-resume"
                )
        write_json_atomic(cfg_path, config.to_json())

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.path / "model.pt"

    def log(self, record: dict) -> None:
        record = {"time_s": round(time.monotonic() - self.start_time, 3), **record}
        with open(self.path / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        p = self.path / "log.jsonl"
        return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []

    def save_checkpoint(self, state: dict) -> None:
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save({**state, "rng": rng_state()}, tmp)

    def load_checkpoint(self) -> dict | None:
        """The latest checkpoint (None: start afresh); restores the random generators it saved
        (checkpoints from before they were saved resume without them)."""
        if not (self.config.resume and self.checkpoint_path.exists()):
            return None
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "rng" in state:
            restore_rng_state(state["rng"])
        return state

    def out_of_time(self) -> bool:
        m = self.config.max_minutes
        return m is not None and (time.monotonic() - self.start_time) > 60.0 * m
