"""What ``placerank train --method selavpr`` is configured with: the backbones it trains (and
the SelaVPR model each one builds), their default learning rates, and the ``--option`` settings
with their range checks and the official model-selection rule.

Split out of :mod:`placerank.train.selavpr` (which re-exports every name) so the trainer there
is the training loop only; the mining and the step live in :mod:`.selavpr_mining`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from placerank.errors import PlaceRankError
from placerank.models.selavpr import SelaVPRModel
from placerank.options import parse_options
from placerank.train.common import TrainConfig

BACKBONES = {
    "effnet-lite0": "selavpr-effnet-lite0",
    "effnet-lite1": "selavpr-effnet-lite1",
    "effnet-lite2": "selavpr-effnet-lite2",
    "dinov2-vits14": "selavpr-vits14",
    "dinov2-vitb14": "selavpr-vitb14",
    "dinov2-vitl14": "selavpr-vitl14",
}
# Official lr is 1e-5 (ViT-L adapters). The CNN adapters/head start from zero on a much smaller
# network; 1e-4 moved recall within minutes on CPU where 1e-5 barely did (see docs/selavpr.md).
DEFAULT_LR = {"effnet-lite0": 1e-4, "effnet-lite1": 1e-4, "effnet-lite2": 1e-4}
OFFICIAL_LR = 1e-5


@dataclass
class SelaVPROptions:
    queries_per_loop: int = 1000  # official: 1000 queries per cache refresh
    negative_pool: int = 1000  # official: 1000 random database images per refresh
    num_negatives: int = 2  # official: 2 hardest negatives per query
    batch_tuples: int = 4  # official: 4 tuples (16 images) per step
    loops_per_epoch: int = 1  # official: queries_per_epoch / 1000 (30 for MSLS)
    margin: float = 0.1  # global triplet margin
    local_weight: float = 1.0  # weight of the MNN local loss
    neighbour_exclusion: int = -1  # frames; -1: 2 on frame-labelled routes, 0 for place ids
    cache_batch: int = 16  # batch size of the mining descriptor pass
    prefix_cache_mb: float = 2048.0  # RAM for cached frozen-prefix features (CNN backbones)
    val_database: str = ""  # validation pair evaluated after every epoch: the best epoch
    val_queries: str = ""  # (R@5, ties R@1) becomes model.pt; empty: the last epoch
    val_frame_tolerance: int = -1  # -1: the eval default for the data's positions
    val_radius: float = -1.0
    val_frames: tuple[int, ...] = ()  # START,STOP: keep validation frames START <= k < STOP
    val_select_n: int = 5  # the Recall@N that picks the epoch (official: 5; 1 when R@5 saturates)
    # Select on the recall after MNN re-ranking of the top val_rerank_top_k (official) or on the
    # global recall; "auto": re-ranked for DINOv2 backbones, global for the CNN (the measured recipe).
    val_rerank: str = "auto"  # auto | true | false
    val_rerank_top_k: int = 100  # candidates re-ranked in validation (official: 100)
    # Stop after this many validations without improvement; -1: 3 (official) for DINOv2
    # backbones, 0 (never: run every epoch, the measured recipe) for the CNN.
    val_patience: int = -1

    @classmethod
    def parse(cls, values) -> SelaVPROptions:
        """Typed ``--option`` values (:func:`placerank.options.parse_options`), then range checks."""
        out = parse_options(cls, values, what="selavpr option")
        for k in (
            "queries_per_loop",
            "negative_pool",
            "num_negatives",
            "batch_tuples",
            "loops_per_epoch",
            "cache_batch",
        ):
            if getattr(out, k) < 1:
                raise PlaceRankError(f"selavpr option {k} must be >= 1, got {getattr(out, k)}")
        if out.val_rerank not in ("auto", "true", "false"):
            raise PlaceRankError(f"selavpr option val_rerank must be auto, true or false, got '{out.val_rerank}'")
        return out

    def official_selection(self, backbone: str) -> tuple[bool, int]:
        """(select on the re-ranked recall?, patience) with "auto" / -1 resolved: the official
        re-ranked R@5 with patience 3 for DINOv2 backbones, global recall without early stop for
        the CNN recipe."""
        vit = backbone.startswith("dinov2-")
        rerank = vit if self.val_rerank == "auto" else self.val_rerank == "true"
        patience = (3 if vit else 0) if self.val_patience < 0 else self.val_patience
        return rerank, patience


def build_model(config: TrainConfig) -> tuple[SelaVPRModel, dict]:
    """The model to train and the constructor options saved in ``model.pt``."""
    from placerank.models import create
    from placerank.models.weights import resolve_weights

    if config.backbone not in BACKBONES:
        raise PlaceRankError(f"selavpr cannot train on backbone '{config.backbone}'; known: {', '.join(BACKBONES)}")
    name = BACKBONES[config.backbone]
    kwargs: dict = {}
    if config.image_size is not None:
        kwargs["image_size"] = [int(v) for v in config.image_size]
    weights: str | Path | None = config.weights
    if weights is None and config.backbone.startswith("dinov2-"):
        arch = config.backbone.split("-")[1]
        weights = resolve_weights(
            f"dinov2_{arch}_pretrain.pth", None, f"DINOv2 {arch} (training starts from Meta's weights)"
        )
    model = create(name, weights=weights, **kwargs)
    if not isinstance(model, SelaVPRModel):
        raise PlaceRankError(f"{name} did not build a SelaVPR model")
    if getattr(model.backbone, "num_register_tokens", 0):
        kwargs["num_register_tokens"] = int(cast(Any, model.backbone).num_register_tokens)
    return model, kwargs
