"""``--option key=value`` settings of ``placerank train --method sfrs`` (defaults: the paper's run)."""

from __future__ import annotations

from dataclasses import dataclass

from placerank.errors import PlaceRankError
from placerank.options import parse_options


@dataclass
class SFRSOptions:
    """``--option key=value`` settings of ``--method sfrs`` (defaults: the paper's run)."""

    generations: int = 4  # generation 0 (hard loss only) + 3 self-supervised ones
    gen0_epochs: int = 1  # generation 0 trains one epoch; later ones use --epochs
    batch_tuples: int = 4  # tuples per optimizer step, over all processes (4 GPUs x 1)
    neg_num: int = 10
    neg_pool: int = 1000
    pos_pool: int = 20
    pos_num: int = 10
    cache_size: int = 1000  # anchors per feature-cache refresh
    queries_per_epoch: int = 0  # 0: every anchor each epoch; N: a random N (CPU budgets)
    temperatures: str = "0.07,0.07,0.06,0.05"  # [0]: student/SARE tau; [g]: teacher tau of gen g
    soft_weight: float = 0.5
    similarity: str = "dot"  # dot (SFRS) | euclidean (NetVLAD/SARE baselines)
    k1: int = 20
    k2: int = 1
    rerank_lambda: float = 0.1
    # k-reciprocal input of the difficult positives: "official" (OpenIBL: one set of every
    # training image, each once) | "chunk" (the chunk's anchors against every image, the anchor
    # included, above rerank_gallery images only their nearest images and positive pools)
    rerank_input: str = "official"
    rerank_gallery: int = 2000  # rerank_input=chunk: every image up to this many, else candidates
    momentum: float = 0.9
    weight_decay: float = 0.001
    pos_tolerance: int = 0  # frame labels: positives within this many frames
    neg_exclusion: int = 5  # frame labels: negatives more than this many frames away
    augment: bool = True  # ColorJitter(0.7, 0.7, 0.7, 0.5) before the resize
    cache_frozen: bool = False  # run the frozen stem once per image (CPU speed-up; no augmentation)
    pca_dim: int = 4096  # 0: no PCA (descriptor = VLAD)
    pca_samples: int = 10000
    whiten: bool = True
    kmeans_images: int = 500
    kmeans_per_image: int = 100
    extract_batch: int = 16
    save_untrained: bool = True  # RUN_DIR/untrained.pt: the initial model with PCA (a baseline)
    val_database: str = ""
    val_queries: str = ""
    val_frame_tolerance: int = -1  # -1: the eval default for the data's positions
    val_radius: float = -1.0
    val_frames: tuple[int, ...] = ()  # START,STOP: keep validation frames START <= k < STOP

    @classmethod
    def parse(cls, values) -> SFRSOptions:
        """Typed ``--option`` values (:func:`placerank.options.parse_options`), then checks."""
        opts = parse_options(cls, values, what="sfrs option")
        opts.validate()
        return opts

    @property
    def temperature_list(self) -> list[float]:
        return [float(t) for t in self.temperatures.split(",") if t.strip()]

    def validate(self) -> None:
        try:
            temps = self.temperature_list
        except ValueError:
            raise PlaceRankError(
                f"sfrs option temperatures={self.temperatures!r}: give comma-separated numbers"
            ) from None
        if not temps or min(temps) <= 0:
            raise PlaceRankError("sfrs option temperatures: need at least one positive temperature")
        if self.generations < 1:
            raise PlaceRankError("sfrs option generations must be >= 1")
        if self.similarity not in ("dot", "euclidean"):
            raise PlaceRankError(f"sfrs option similarity must be dot or euclidean, got '{self.similarity}'")
        if self.rerank_input not in ("official", "chunk"):
            raise PlaceRankError(f"sfrs option rerank_input must be official or chunk, got '{self.rerank_input}'")
        for name in (
            "batch_tuples",
            "neg_num",
            "neg_pool",
            "pos_pool",
            "pos_num",
            "cache_size",
            "k1",
            "k2",
            "extract_batch",
        ):
            if getattr(self, name) < 1:
                raise PlaceRankError(f"sfrs option {name} must be >= 1")
        if self.neg_exclusion < self.pos_tolerance:
            raise PlaceRankError(
                f"sfrs option neg_exclusion ({self.neg_exclusion}) must be >= pos_tolerance "
                f"({self.pos_tolerance}): a positive cannot also be a negative"
            )
