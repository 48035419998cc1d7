"""FoL's losses (spec ``fol.md`` §3), generalised away from the official 322 px / 23 x 23 /
89 x 89 / 4-images-per-place hard-coding.

L = w_ms·L_MS + w_local·L_local + w_sal·(KL₁ + KL₂) + w_cel·L_CEL + w_ws·L_WS
with defaults 1, 1, 0.005, 1, 1 (§3.6), each configurable in :class:`FoLLossConfig`.

Batches are place-labelled (any P x K, ideally ordered by place as
:class:`placerank.train.common.PlaceBatchSampler` yields them); partners are found from the
labels, not from fixed batch positions, so any K >= 2 works.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from placerank.errors import PlaceRankError
from placerank.rerank.mutual_nn import mnn_mean_similarity
from placerank.train.losses.fol_adapt import WS_CELLS, WS_MINERS, centre_cells, mine_relative, term_grad_norms


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
# Weakly supervised pseudo-correspondence loss
# ---------------------------------------------------------------------------------------------


def patch_to_local_cell(
    r: torch.Tensor, c: torch.Tensor, grid: tuple[int, int], local_grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-grid cell of patch (r, c): row = round((r + 0.5)·H'/h), col likewise, clamped.

    This is the official round((14r + 7)·89/322) written for any grid: at h = 23, H' = 89,
    S = 322 the two agree for every r (tested)."""
    h, w = grid
    Hl, Wl = local_grid
    row = torch.round((r.double() + 0.5) * Hl / h).long().clamp(0, Hl - 1)
    col = torch.round((c.double() + 0.5) * Wl / w).long().clamp(0, Wl - 1)
    return row, col


@torch.no_grad()
def mine_pseudo_correspondences(
    feat_i: torch.Tensor,
    feat_j: torch.Tensor,
    plan_i: torch.Tensor,
    plan_j: torch.Tensor,
    attn_i: torch.Tensor,
    cfg: FoLLossConfig,
) -> list[tuple[int, int, float]]:
    """Patch pairs (a in i, b in j, s₁) for one image pair (§3.5, no gradient).

    ``feat_*`` (C, N) L2-normalised patch features, ``plan_*`` (K, N), ``attn_i`` (N,) = Ã_i.
    Anchors: Ã_i(a) > 0.1 in index order (the first dropped, as in the official code); each
    anchor's cluster κ = argmax_k P_i(k, a); candidates b with P_j(κ, b) > 0.1; accept the best
    when s₁ > 0.8 and s₁/s₂ > 2 (a missing or negative s₂ fails); keep the first 5 accepted.
    ``cfg.ws_miner == "relative"``: the CNN rules of :func:`~.fol_adapt.mine_relative` instead.
    """
    if cfg.ws_miner == "relative":
        return mine_relative(feat_i, feat_j, plan_i, plan_j, attn_i, cfg)
    anchors = torch.nonzero(attn_i > cfg.ws_anchor_threshold, as_tuple=False).squeeze(1)
    if cfg.ws_drop_first_anchor:
        anchors = anchors[1:]
    if anchors.numel() == 0:
        return []
    kappa = plan_i[:, anchors].argmax(dim=0)  # (A,)
    cand = plan_j[kappa] > cfg.ws_assign_threshold  # (A, N)
    cos = feat_i[:, anchors].t() @ feat_j  # (A, N)
    cos = torch.where(cand, cos, torch.full_like(cos, -10.0))
    if cos.shape[1] < 2:
        return []
    top = cos.topk(2, dim=1)
    s1, s2 = top.values[:, 0], top.values[:, 1]
    ok = (s1 > cfg.ws_min_cos) & (s1 / s2 > cfg.ws_ratio)  # s₂ < 0 (incl. the -10 fill) gives a negative ratio
    pairs = []
    for k in torch.nonzero(ok, as_tuple=False).squeeze(1).tolist()[: cfg.ws_max_per_image]:
        pairs.append((int(anchors[k]), int(top.indices[k, 0]), float(s1[k])))
    return pairs


def dense_cell_descriptors(local_map_normed: torch.Tensor):
    """``(b, rows, cols) -> (n, D)``: 3 x 3 means of a dense normalised local map (B, D, H', W')
    at the given cells (borders average the cells that exist)."""
    pooled = F.avg_pool2d(local_map_normed, 3, stride=1, padding=1, count_include_pad=False)

    def cells(b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return pooled[b, :, rows, cols]

    return cells


def pseudo_correspondence_loss(
    patch_feats: torch.Tensor,
    plan: torch.Tensor,
    attn_thr: torch.Tensor,
    cell_descriptors,
    grid: tuple[int, int],
    local_grid: tuple[int, int],
    partners: Sequence[int],
    cfg: FoLLossConfig,
) -> tuple[torch.Tensor, int]:
    """L_WS of §3.5. ``patch_feats`` (B, C, N) L2-normalised backbone features, ``plan`` (B, K, N),
    ``attn_thr`` (B, N) = Ã; ``cell_descriptors(b, rows, cols)`` gives, with gradient, the mean
    of the 3 x 3 neighbourhood of the normalised local map at those cells of the ``local_grid``
    (:func:`dense_cell_descriptors`, or the model's window-based ``pooled_cells``).

    Pair loss = s₁·(1 − cos(ℓ_i(a), ℓ_j(b)))·0.01 (ℓ not re-normalised); L_WS = Σ pair losses /
    #pairs (≤ ``ws_max_pairs``), 0 if none. Returns (loss, number of pairs).
    """
    B = patch_feats.shape[0]
    h, w = grid
    rows = []
    for i in range(B):
        j = partners[i]
        if j < 0:
            continue
        for a, b, s1 in mine_pseudo_correspondences(patch_feats[i], patch_feats[j], plan[i], plan[j], attn_thr[i], cfg):
            rows.append((i, a, j, b, s1))
            if len(rows) >= cfg.ws_max_pairs:
                break
        if len(rows) >= cfg.ws_max_pairs:
            break
    if not rows:
        return attn_thr.new_zeros(()), 0
    dev = patch_feats.device
    t = torch.tensor([(i, a, j, b) for i, a, j, b, _ in rows], dtype=torch.long, device=dev)
    sims = torch.tensor([r[4] for r in rows], dtype=torch.float32, device=dev)
    to_cell = patch_to_local_cell if cfg.ws_cells == "official" else lambda r, c, g, lg: centre_cells(r, c, lg)
    ri, ci = to_cell(t[:, 1] // w, t[:, 1] % w, grid, local_grid)
    rj, cj = to_cell(t[:, 3] // w, t[:, 3] % w, grid, local_grid)
    li = cell_descriptors(t[:, 0], ri, ci)
    lj = cell_descriptors(t[:, 2], rj, cj)
    per = sims * (1.0 - F.cosine_similarity(li.float(), lj.float(), dim=1)) * cfg.ws_scale
    return per.sum() / len(rows), len(rows)


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
