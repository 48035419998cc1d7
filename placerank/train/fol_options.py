"""The ``--option`` settings of ``placerank train --method fol`` and what they resolve to: the
backbone -> model table, the typed training options (merged with the loss settings of
:class:`~placerank.train.losses.fol_config.FoLLossConfig`), the training images they select and
the local-feature modes.

Split out of :mod:`placerank.train.fol` (which re-exports every name) so the trainer there is
the training loop only; tests and the recipe checks read these settings without running it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from placerank.data.dataset import ImageSet
from placerank.data.places import read_training_set
from placerank.errors import PlaceRankError
from placerank.options import parse_options
from placerank.train.common import TrainConfig
from placerank.train.losses.fol_config import FoLLossConfig

BACKBONE_MODELS = {
    "effnet-lite0": "fol-effnet-lite0",
    "effnet-lite1": "fol-effnet-lite1",
    "effnet-lite2": "fol-effnet-lite2",
    "dinov2-vits14": "fol-vits14",
    "dinov2-vitb14": "fol-vitb14",
    "dinov2-vitl14": "fol-vitl14",
}


@dataclass
class FoLTrainOptions:
    """Method-specific options (``--option KEY=VALUE``)."""

    num_regions: int = 225
    # The model's test-time region features (stored in model.pt). "": the model's default —
    # dense (the official cell set) for fol-vit*, pool3 for the CNN.
    local_mode: str = ""
    # Region features of the local triplet loss. "": dense for fol-vit* (official: every region
    # cell, with gradient), center for the CNN (the CPU step; measured in docs/fol.md).
    train_local_mode: str = ""
    train_blocks: int = 4
    weight_decay: float = 9.5e-9
    lr_decay_iters: int = 10000
    lr_final_factor: float = 0.1
    amp: bool = True
    max_steps: int = 0  # 0: no limit
    gsv_cities: str = ""  # comma-separated dataframe names; empty: all
    gsv_min_images: int = 4
    # GSV-Cities: keep the --images-per-place most recent images of each place by (year, month,
    # lat) — the official deterministic choice; false: every image, K drawn at random per epoch.
    gsv_recent: bool = True
    # Validation pair (``placerank train``'s automatic split, or given): the best R@val_select_n of
    # the global descriptor becomes model.pt, checked every val_every_minutes of training (-1:
    # --max-minutes / 10, or every epoch without it; 0: every epoch); stop after val_patience
    # validations without improvement (0: never).
    val_database: str = ""
    val_queries: str = ""
    val_frame_tolerance: int = -1
    val_radius: float = -1.0
    val_frames: tuple[int, ...] = ()
    val_select_n: int = 5
    val_patience: int = 0
    val_every_minutes: float = -1.0


@dataclass
class FoLOptions(FoLLossConfig, FoLTrainOptions):
    """Every ``--option`` of ``--method fol``: the training options and the loss settings."""


def fol_options(values) -> tuple[FoLTrainOptions, FoLLossConfig]:
    """``--option`` values (strings or typed) -> (training options, loss config); an unknown
    key or a bad value is one line (:func:`placerank.options.parse_options`)."""
    opts = parse_options(FoLOptions, values, what="fol option")
    pick = lambda cls: cls(**{f.name: getattr(opts, f.name) for f in fields(cls)})  # noqa: E731
    return pick(FoLTrainOptions), pick(FoLLossConfig)


def model_name_for(backbone: str) -> str:
    if backbone in BACKBONE_MODELS:
        return BACKBONE_MODELS[backbone]
    if backbone in BACKBONE_MODELS.values():
        return backbone
    raise PlaceRankError(f"fol cannot train on backbone '{backbone}'; use one of: {', '.join(BACKBONE_MODELS)}")


def read_places(config: TrainConfig, opts: FoLTrainOptions) -> ImageSet:
    """Place-labelled images from traversal folders / CSVs / Nordland and GSV-Cities roots
    (GSV-Cities: the ``--images-per-place`` most recent images per place, as the official code,
    unless ``gsv_recent=false``)."""
    cities = [c for c in opts.gsv_cities.split(",") if c] or None
    recent = config.images_per_place if opts.gsv_recent else None
    return read_training_set(config.train, config.frames, cities, opts.gsv_min_images, recent)


def resolve_local_modes(name: str, opts: FoLTrainOptions) -> tuple[str, str]:
    """(test-time local_mode, train_local_mode) with the defaults filled in: the official
    ``dense`` / ``dense`` for ``fol-vit*``, ``pool3`` / ``center`` for the CNN."""
    from placerank.models.fol import CNN_LOCAL_MODE, LOCAL_MODES, VIT_LOCAL_MODE

    vit = name.startswith("fol-vit")
    mode = opts.local_mode or (VIT_LOCAL_MODE if vit else CNN_LOCAL_MODE)
    train_mode = opts.train_local_mode or ("dense" if vit else "center")
    for key, value in (("local_mode", mode), ("train_local_mode", train_mode)):
        if value not in LOCAL_MODES:
            raise PlaceRankError(f"unknown {key} '{value}' (known: {', '.join(LOCAL_MODES)})")
    return mode, train_mode
