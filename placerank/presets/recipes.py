"""Training recipes by name: ``placerank train --preset fol-cpu [--out RUN] [flags ...]``.

A recipe holds every setting of one CPU recipe (``benchmarks/recipes/*_cpu.sh``): the method,
backbone, input size, schedule, learning rate, method options, the training data and the
validation split. Data specs are relative to the shared data folder (``$PLACERANK_DATA`` or
``../shared/data``); :meth:`TrainRecipe.settings` makes them absolute. The command applies the
recipe first and the user's own flags after it, so any flag given overrides the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placerank.data.places import resolve_data_spec
from placerank.presets import register_preset

GARDENS = "gardenspoint_walking"
GARDENS_TRAVERSALS = (f"{GARDENS}/day_left", f"{GARDENS}/day_right", f"{GARDENS}/night_right")


@dataclass(frozen=True)
class ValidationSplit:
    """A database/query pair scored after every epoch; the best epoch becomes ``model.pt``."""

    database: str
    queries: str
    frames: tuple[int, int] | None = None  # keep frames START <= k < STOP of both sides
    frame_tolerance: int = -1
    select_n: int = 5

    def options(self, root: Path) -> dict[str, str]:
        out = {
            "val_database": resolve_data_spec(self.database, root),
            "val_queries": resolve_data_spec(self.queries, root),
            "val_frame_tolerance": str(self.frame_tolerance),
            "val_select_n": str(self.select_n),
        }
        if self.frames is not None:
            out["val_frames"] = f"{self.frames[0]},{self.frames[1]}"
        return out


@dataclass(frozen=True)
class TrainRecipe:
    """The settings of ``placerank train`` for one recipe (names as :class:`TrainConfig`'s)."""

    method: str
    backbone: str
    train: tuple[str, ...]  # specs relative to the shared data folder
    image_size: tuple[int, int]
    epochs: int
    lr: float
    frames: tuple[int, int] | None = None
    max_minutes: float | None = None
    batch_places: int = 8
    images_per_place: int = 2
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = None
    options: dict[str, str] = field(default_factory=dict)  # --option KEY=VALUE, as strings
    validation: ValidationSplit | None = None

    def settings(self, root: Path) -> dict[str, Any]:
        """Keyword values for ``TrainConfig`` with the data specs made absolute under ``root``."""
        options = dict(self.options)
        if self.validation is not None:
            options.update(self.validation.options(root))
        return {
            "method": self.method,
            "backbone": self.backbone,
            "train": [resolve_data_spec(s, root) for s in self.train],
            "image_size": self.image_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "frames": self.frames,
            "max_minutes": self.max_minutes,
            "batch_places": self.batch_places,
            "images_per_place": self.images_per_place,
            "seed": self.seed,
            "device": self.device,
            "num_workers": self.num_workers,
            "options": options,
        }

    def defaults(self, backbone: str | None = None) -> dict[str, Any]:
        """The settings ``placerank train --method M`` takes from this recipe when no ``--preset``
        is given: everything but the data (the user's ``--train``; validation comes from the
        automatic split, :mod:`placerank.train.auto_split`), with the run length of
        :data:`DEFAULT_RUN` (time or early stopping ends it, not the epoch count). The CPU
        backbone's input size, lr and options do not fit another backbone: for one, only the run
        length and the validation settings are taken."""
        run = DEFAULT_RUN[self.method]
        options = {**self.options, **run["options"]}
        settings: dict[str, Any] = {
            "method": self.method,
            "epochs": run["epochs"],
            "max_minutes": DEFAULT_MINUTES,
            "options": options,
        }
        if backbone is None or backbone == self.backbone:
            base = self.settings(Path("."))
            settings.update({k: base[k] for k in ("backbone", "image_size", "lr", "batch_places", "images_per_place")})
            settings.update({k: base[k] for k in ("seed", "num_workers")})
        else:
            settings["options"] = dict(run["options"])
        return settings


#: ``placerank train --method M`` without ``--preset`` runs this recipe's settings on the user's data
DEFAULT_RECIPES = {"fol": "fol-cpu", "selavpr": "selavpr-cpu", "sfrs": "sfrs-cpu"}
DEFAULT_MINUTES = 20.0  # about 20 minutes on a 2-core CPU
#: the run length of the default recipes, and how they select the best epoch on the automatic split:
#: FoL and SelaVPR validate after every epoch (FoL also every few minutes of a long epoch) and stop
#: after 3 validations without improvement; SFRS keeps its measured 1 + 3 epochs over 2 generations
#: (its generation structure needs a fixed count) and selects on validation R@5.
DEFAULT_RUN: dict[str, dict[str, Any]] = {
    # FoL: R@5 of the global descriptor (the official selection re-ranks first; too slow per epoch on CPU)
    "fol": {"epochs": 1000, "options": {"val_select_n": "5", "val_patience": "3"}},
    # SelaVPR CNN: global R@1, as the selavpr-cpu recipe measured (R@5 saturates on ~20 queries)
    "selavpr": {"epochs": 1000, "options": {"val_select_n": "1", "val_patience": "3"}},
    "sfrs": {"epochs": 3, "options": {}},
}


def default_recipe(method: str) -> TrainRecipe | None:
    """The CPU recipe ``--method METHOD`` defaults to (None: a method without one)."""
    from placerank.presets import get_preset

    name = DEFAULT_RECIPES.get(method)
    return None if name is None else get_preset(name, kind="train")


@register_preset(
    "fol-cpu",
    "FoL on EfficientNet-Lite0, CPU (~20 min): GardensPoint frames 0-99 x 3 traversals + 300 Nordland places",
    kind="train",
)
def fol_cpu() -> TrainRecipe:
    # benchmarks/recipes/fol_cpu.sh: 8 places x 2 images, AdamW lr 3e-4 decayed linearly to 0.1x
    # over 600 steps, 240x432 input, stopped after 20 minutes (50 epochs is never reached).
    return TrainRecipe(
        method="fol",
        backbone="effnet-lite0",
        train=(*GARDENS_TRAVERSALS, "nordland_seqslam_64x32?places=300"),
        frames=(0, 100),
        image_size=(240, 432),
        epochs=50,
        max_minutes=20.0,
        lr=3e-4,
        num_workers=1,
        options={"lr_decay_iters": "600"},
    )


@register_preset(
    "selavpr-cpu",
    "SelaVPR on EfficientNet-Lite0, CPU (~22 min): GardensPoint frames 0-79 x 3 traversals, validated on 80-99",
    kind="train",
)
def selavpr_cpu() -> TrainRecipe:
    # benchmarks/recipes/selavpr_cpu.sh: 10 short epochs (120 queries, 240-image negative pool per
    # loop), the best epoch on validation frames 80-99 (day_right db vs night_right queries,
    # |i-j| <= 2, R@1 since R@5 saturates on 20 queries) becomes model.pt.
    return TrainRecipe(
        method="selavpr",
        backbone="effnet-lite0",
        train=GARDENS_TRAVERSALS,
        frames=(0, 80),
        image_size=(224, 400),
        epochs=10,
        max_minutes=22.0,
        lr=1e-4,
        device="cpu",
        options={"queries_per_loop": "120", "negative_pool": "240"},
        validation=ValidationSplit(
            f"{GARDENS}/day_right", f"{GARDENS}/night_right", frames=(80, 100), frame_tolerance=2, select_n=1
        ),
    )


@register_preset(
    "sfrs-cpu",
    "SFRS on EfficientNet-Lite0, CPU (~24 min): generations 0 + 1 on GardensPoint frames 0-89 x 3 traversals",
    kind="train",
)
def sfrs_cpu() -> TrainRecipe:
    # benchmarks/recipes/sfrs_cpu.sh: generation 0 (1 epoch) + generation 1 (3 epochs), lr 0.01,
    # positives within 3 frames from the other traversals, negatives more than 5 frames away,
    # frozen-stem cache, PCA-whitening to 256-d. Difficult positives: the official k-reciprocal
    # input (rerank_input=official, the default; rerank_input=chunk measured in docs/sfrs.md).
    return TrainRecipe(
        method="sfrs",
        backbone="effnet-lite0",
        train=GARDENS_TRAVERSALS,
        frames=(0, 90),
        image_size=(224, 384),
        epochs=3,
        max_minutes=24.0,
        lr=0.01,
        device="cpu",
        options={
            "generations": "2",
            "batch_tuples": "4",
            "neg_num": "10",
            "pos_num": "10",
            "pos_tolerance": "3",
            "neg_exclusion": "5",
            "cache_frozen": "true",
            "pca_dim": "256",
        },
    )
