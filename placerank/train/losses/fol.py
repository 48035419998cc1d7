"""FoL's losses (spec ``fol.md`` §3), generalised away from the official 322 px / 23 x 23 /
89 x 89 / 4-images-per-place hard-coding.

L = w_ms·L_MS + w_local·L_local + w_sal·(KL₁ + KL₂) + w_cel·L_CEL + w_ws·L_WS
with defaults 1, 1, 0.005, 1, 1 (§3.6), each configurable in :class:`FoLLossConfig`.

Batches are place-labelled (any P x K, ideally ordered by place as
:class:`placerank.train.common.PlaceBatchSampler` yields them); partners are found from the
labels, not from fixed batch positions, so any K >= 2 works.

The settings live in :mod:`.fol_config`, the pseudo-correspondence loss in
:mod:`.fol_correspondence` and the CNN adaptation in :mod:`.fol_adapt`; this module re-exports
their public names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from placerank.errors import PlaceRankError
from placerank.rerank.mutual_nn import mnn_mean_similarity
from placerank.train.losses.fol_adapt import WS_CELLS, WS_MINERS, term_grad_norms
from placerank.train.losses.fol_config import FoLLossConfig
from placerank.train.losses.fol_correspondence import (  # noqa: F401  (re-exported: tests, docs)
    dense_cell_descriptors,
    mine_pseudo_correspondences,
    patch_to_local_cell,
    pseudo_correspondence_loss,
)

# ---------------------------------------------------------------------------------------------
# Global: multi-similarity loss + miner (pytorch-metric-learning)
# ---------------------------------------------------------------------------------------------


class MultiSimilarity:
    """MS loss (α=1, β=50, λ=0) on the dot product, MS miner (ε=0.1) on cosine (§3.1)."""

    def __init__(self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1):
        from pytorch_metric_learning import distances, losses, miners

        self.loss = losses.MultiSimilarityLoss(
            alpha=alpha, beta=beta, base=base, distance=distances.DotProductSimilarity()
        )
        self.miner = miners.MultiSimilarityMiner(epsilon=epsilon, distance=distances.CosineSimilarity())

    def __call__(self, descriptors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Returns (loss, fraction of images that anchor at least one mined pair)."""
        pairs = self.miner(descriptors, labels)
        loss = self.loss(descriptors, labels, pairs)
        mined = torch.unique(torch.cat([pairs[0], pairs[2]])) if len(pairs[0]) + len(pairs[2]) else pairs[0]
        return loss, float(mined.numel()) / max(1, descriptors.shape[0])


# ---------------------------------------------------------------------------------------------
# SAL: extraction/aggregation map alignment
# ---------------------------------------------------------------------------------------------


def sal_terms(map_e: torch.Tensor, map_a: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL₁, KL₂) of §3.2, each summed over positions and averaged over the batch.

    KL₁ = Σ Mᵉ (log Mᵉ − log Mᵃ) with Mᵉ detached (gradient reaches Mᵃ only);
    KL₂ = Σ Mᵃ (log Mᵃ − log Mᵉ) with Mᵃ detached (gradient reaches Mᵉ only).
    """
    e_d, a_d = map_e.detach(), map_a.detach()
    log_e, log_a = map_e.clamp_min(eps).log(), map_a.clamp_min(eps).log()
    kl1 = (e_d * (e_d.clamp_min(eps).log() - log_a)).sum(dim=1).mean()
    kl2 = (a_d * (a_d.clamp_min(eps).log() - log_e)).sum(dim=1).mean()
    return kl1, kl2


# ---------------------------------------------------------------------------------------------
# Partners inside a place-labelled batch
# ---------------------------------------------------------------------------------------------


def _groups(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, l in enumerate(labels):
        groups.setdefault(int(l), []).append(i)
    return groups


def next_partner(labels: Sequence[int]) -> list[int]:
    """Next image of the same place in batch order, cyclic (0→1→…→K−1→0); -1 if alone."""
    out = [-1] * len(labels)
    for members in _groups(labels).values():
        if len(members) > 1:
            for k, i in enumerate(members):
                out[i] = members[(k + 1) % len(members)]
    return out


def random_partner(labels: Sequence[int], rng: random.Random) -> list[int]:
    """A uniformly random other image of the same place; -1 if alone."""
    groups = _groups(labels)
    out = []
    for i, l in enumerate(labels):
        others = [j for j in groups[int(l)] if j != i]
        out.append(rng.choice(others) if others else -1)
    return out


# ---------------------------------------------------------------------------------------------
# CEL: foreground/background prototype consistency
# ---------------------------------------------------------------------------------------------


def cel_loss(
    region_score: torch.Tensor,
    grid: tuple[int, int],
    local_map_normed: torch.Tensor,
    partners: Sequence[int],
    fg_weight: float = 0.7,
    bg_weight: float = 0.3,
) -> torch.Tensor:
    """L_CEL of §3.3 (the released code's version: no term pushes fg away from bg).

    ``region_score`` (B, N) = training R, reshaped to ``grid`` and bilinearly upsampled
    (align_corners=True) to the local grid to give W; ``local_map_normed`` (B, D, H', W') is
    detached here, so the gradient reaches only W. fg = Σ W·L̂, bg = Σ (1 − W)·L̂, both
    L2-normalised; loss_i = fg_w·(1 − cos(fg_i, fg_j)) + bg_w·(1 − cos(bg_i, bg_j)); mean over
    images with a partner (divided by the batch size, as the official code does).
    """
    B = region_score.shape[0]
    h, w = grid
    L = local_map_normed.detach()
    W = F.interpolate(region_score.reshape(B, 1, h, w), size=L.shape[-2:], mode="bilinear", align_corners=True)
    fg = F.normalize((W * L).sum(dim=(2, 3)), dim=1)
    bg = F.normalize(((1.0 - W) * L).sum(dim=(2, 3)), dim=1)
    idx = torch.tensor([i for i in range(B) if partners[i] >= 0], dtype=torch.long, device=fg.device)
    if idx.numel() == 0:
        return region_score.sum() * 0.0
    jdx = torch.tensor([partners[i] for i in idx.tolist()], dtype=torch.long, device=fg.device)
    per = fg_weight * (1 - (fg[idx] * fg[jdx]).sum(1)) + bg_weight * (1 - (bg[idx] * bg[jdx]).sum(1))
    return per.sum() / B


# ---------------------------------------------------------------------------------------------
# Local triplet loss (MNN similarity on the selected region sets)
# ---------------------------------------------------------------------------------------------


def batch_hard_triplets(descriptors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(anchor, hardest positive, hardest negative) per anchor that has both (pml BatchHardMiner,
    Euclidean distance on the L2-normalised global descriptors)."""
    from pytorch_metric_learning import miners

    return miners.BatchHardMiner()(descriptors.detach(), labels)


def local_triplet_loss(
    local_sets: Sequence[torch.Tensor],
    triplets: tuple[torch.Tensor, ...],
    threshold: float = 0.7,
    margin: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """L_local of §3.4: Σ_triplets max(0, sim(a, n) − sim(a, p) + margin), where sim is the mean
    cosine of the mutual nearest neighbours with cosine > ``threshold`` between two region sets
    (:func:`placerank.rerank.mutual_nn.mnn_mean_similarity`: one surviving pair gives its cosine).

    A pair with no mutual match above the threshold has the official similarity NaN; its triplet
    contributes nothing here (officially the NaN makes the whole batch loss NaN, and the fp16
    GradScaler then skips the step: docs/fol.md). No NaN reaches the total or the gradients.
    ``reduction="mean"`` averages over the triplets that count."""
    a, p, n = triplets
    terms = []
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        s_ap = mnn_mean_similarity(local_sets[ai], local_sets[pi], threshold)
        s_an = mnn_mean_similarity(local_sets[ai], local_sets[ni], threshold)
        if bool(torch.isnan(s_ap.detach())) or bool(torch.isnan(s_an.detach())):
            continue
        terms.append(F.relu(s_an.float() - s_ap.float() + margin))
    if not terms:
        return local_sets[0].float().sum() * 0.0 if len(local_sets) else torch.zeros(())
    t = torch.stack(terms)
    return t.sum() if reduction == "sum" else t.mean()


# ---------------------------------------------------------------------------------------------
# Everything together
# ---------------------------------------------------------------------------------------------


class FoLCriterion:
    """Computes all FoL losses from a :class:`placerank.models.fol.FoLOutput` and the batch's
    place labels; returns the weighted total and a log dict.

    ``local_map_normed`` (B, 128, H', W') is the dense normalised local map (CEL detaches it);
    ``cell_descriptors`` computes the pseudo-correspondence descriptors with gradient (default:
    pooled from ``local_map_normed``, which must then carry gradient).
    """

    def __init__(self, cfg: FoLLossConfig | None = None, grad_params: Sequence = (), head_params: Sequence = ()):
        """``grad_params`` (e.g. :func:`~.fol_adapt.shared_parameters`): every ``grad_log_every``
        calls the log gets each weighted term's gradient norm w.r.t. them (``grad_<term>``), and
        w.r.t. ``head_params`` (``grad_head_<term>``)."""
        self.cfg = cfg or FoLLossConfig()
        if self.cfg.ws_miner not in WS_MINERS or self.cfg.ws_cells not in WS_CELLS:
            raise PlaceRankError(
                f"fol option ws_miner must be one of {', '.join(WS_MINERS)} and ws_cells one of "
                f"{', '.join(WS_CELLS)}, got '{self.cfg.ws_miner}' / '{self.cfg.ws_cells}'"
            )
        self.ms = MultiSimilarity(self.cfg.ms_alpha, self.cfg.ms_beta, self.cfg.ms_base, self.cfg.miner_epsilon)
        self.rng = random.Random(self.cfg.seed)
        self.grad_params, self.head_params = list(grad_params), list(head_params)
        self.calls = 0

    def __call__(
        self,
        out,
        local_sets: Sequence[torch.Tensor],
        labels: torch.Tensor,
        local_map_normed: torch.Tensor,
        cell_descriptors=None,
    ) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        lab = labels.tolist()
        desc = out.descriptor
        l_ms, mined = self.ms(desc, labels)
        kl1, kl2 = sal_terms(out.map_e, out.map_a)
        R = out.region_score(training=True)
        l_cel = cel_loss(
            R, out.grid, local_map_normed, random_partner(lab, self.rng), cfg.cel_fg_weight, cfg.cel_bg_weight
        )
        triplets = batch_hard_triplets(desc, labels)
        l_local = local_triplet_loss(local_sets, triplets, cfg.local_threshold, cfg.local_margin, cfg.local_reduction)
        feats = F.normalize(out.feature_map.detach().float().flatten(2), dim=1)
        cells = cell_descriptors or dense_cell_descriptors(local_map_normed)
        l_ws, n_pairs = pseudo_correspondence_loss(
            feats,
            out.plan.detach(),
            out.attention_thr.detach(),
            cells,
            out.grid,
            (int(local_map_normed.shape[-2]), int(local_map_normed.shape[-1])),
            next_partner(lab),
            cfg,
        )
        terms = {
            "ms": cfg.w_ms * l_ms,
            "local": cfg.w_local * l_local,
            "sal": cfg.w_sal * (kl1 + kl2),
            "cel": cfg.w_cel * l_cel,
            "ws": cfg.w_ws * l_ws,
        }
        total = terms["ms"] + terms["local"] + terms["sal"] + terms["cel"] + terms["ws"]
        every, self.calls = cfg.grad_log_every, self.calls + 1
        grads = {}
        if self.grad_params and every > 0 and (self.calls - 1) % every == 0 and total.requires_grad:
            grads = term_grad_norms(terms, self.grad_params, self.head_params)
        v = lambda t: float(t.detach())  # noqa: E731
        log = {
            "loss": v(total),
            "ms": v(l_ms),
            "local": v(l_local),
            "kl1": v(kl1),
            "kl2": v(kl2),
            "cel": v(l_cel),
            "ws": v(l_ws),
            "ws_pairs": n_pairs,
            "triplets": int(triplets[0].numel()),
            "ms_mined": round(mined, 3),
            **grads,
        }
        return total, log
