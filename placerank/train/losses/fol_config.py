"""The settings of FoL's losses (:class:`FoLLossConfig`), in a module of their own so that the
loss terms split over :mod:`.fol` and :mod:`.fol_correspondence` share them without an import
circle."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FoLLossConfig:
    """Weights and thresholds of FoL's losses (defaults = the official code)."""

    w_ms: float = 1.0
    w_local: float = 1.0
    w_sal: float = 0.005  # applied to KL₁ + KL₂
    w_cel: float = 1.0
    w_ws: float = 1.0
    # multi-similarity (§3.1)
    ms_alpha: float = 1.0
    ms_beta: float = 50.0
    ms_base: float = 0.0
    miner_epsilon: float = 0.1
    # local triplet loss (§3.4)
    local_threshold: float = 0.7
    local_margin: float = 0.0
    local_reduction: str = "sum"  # the official code sums over triplets (pitfall 15); "mean" to average
    # CEL (§3.3)
    cel_fg_weight: float = 0.7
    cel_bg_weight: float = 0.3
    # pseudo-correspondences (§3.5)
    ws_anchor_threshold: float = 0.1  # Ã(a) > 0.1
    ws_assign_threshold: float = 0.1  # P_j(κ, b) > 0.1
    ws_min_cos: float = 0.8
    ws_ratio: float = 2.0
    ws_max_per_image: int = 5
    ws_max_pairs: int = 1200
    ws_scale: float = 0.01
    ws_drop_first_anchor: bool = True  # official quirk, kept for parity
    # CNN adaptation (train/losses/fol_adapt.py; the CNN's defaults there): "official" miner |
    # "relative" (top-fraction candidates per cluster row, mutual check, cos > ws_mutual_min_cos)
    ws_miner: str = "official"
    ws_candidate_fraction: float = 0.1
    ws_mutual_min_cos: float = 0.5
    ws_cells: str = "official"  # patch -> up-conv cell: "official" round((r+.5)H'/h) | "center" (4r, 4c)
    grad_log_every: int = 20  # log each term's gradient norm every N steps (0: never)
    seed: int = 0  # CEL partner choice
