"""FoL's weakly supervised pseudo-correspondence loss L_WS (spec ``fol.md`` §3.5): patch pairs
mined from the Sinkhorn plan and the backbone features (no gradient), then the local head's
descriptors at those cells pulled together. Split from :mod:`.fol` to keep each file readable;
:mod:`.fol` re-exports every name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from placerank.train.losses.fol_adapt import centre_cells, mine_relative
from placerank.train.losses.fol_config import FoLLossConfig


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
