"""What every training method shares: the config, place-labelled data, a P x K sampler,
and a run folder with per-epoch resumable checkpoints and a JSON-lines loss log.

Validation (:class:`ValidationSet`, :class:`EpochSelector`) lives in :mod:`.validation`; this
module re-exports both names.

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

from placerank.data.dataset import ImageSet
from placerank.errors import DataError, PlaceRankError
from placerank.registry import Registry
from placerank.train.validation import EpochSelector, ValidationSet  # noqa: F401  (re-exported: tests, callers)
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
    "fol_options",
    "fol_step",
    "losses",
    "precision",
    "selavpr_mining",
    "selavpr_options",
    "sfrs_data",
    "sfrs_epoch",
    "sfrs_features",
    "sfrs_mining",
    "sfrs_options",
    "sfrs_step",
    "validation",
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
