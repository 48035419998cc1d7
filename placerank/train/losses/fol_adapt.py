"""FoL's local supervision on a CNN feature map: the relative pseudo-correspondence miner, the
backbone-dependent loss defaults, and per-term gradient norms for the training log.

Why (measured on real GardensPoint frames, ``benchmarks/heldout_local_heads.py``, docs/fol.md):
the official miner (spec ``fol.md`` §3.5) was written for DINOv2 at 322 px, where the Sinkhorn
plan is peaked and patch features are distinctive. On EfficientNet-Lite0's stride-16 map
(15 x 27 = 405 patches at 240 x 432) the same rules mine almost nothing:

- the absolute assignment threshold P_j(κ, b) > 0.1: a column of the plan spreads its kept mass
  over 64 clusters (median max entry 0.014), so < 1 % of the patches have any entry above 0.1 and
  an anchor has 0.03-0.06 candidates on average;
- the ratio test s₁/s₂ > 2 on cosines: neighbouring CNN patches are alike (s₂ ≈ s₁ − 0.05), so it
  never passes, and a lone candidate (s₂ = −10) fails it by construction;
- the first-5-by-index cap keeps the image's top rows (sky, tree tops).

The relative miner keeps FoL's idea (match only inside the anchor's cluster, keep confident
matches) with rules that scale with the map: candidates of anchor a are the
``ws_candidate_fraction`` of patches of j with the largest P_j(κ, ·) (a top-k per cluster row, so
the count follows N), the match b* is the best candidate by cosine, accepted when a is also b*'s
nearest patch in i (mutual check instead of the ratio test) and cos > ``ws_mutual_min_cos``; the
``ws_max_per_image`` most similar accepted pairs are kept. On untrained-head Lite0 features it
mines 40-90 pairs per image pair, 76-87 % of them within one patch row of their partner (random
pairs: 19 %).

The official rules stay the default of the DINOv2 models (``fol-vit*``): :func:`adapt_loss_config`
fills in :data:`CNN_LOSS_DEFAULTS` only for the CNN and only for the keys the user did not set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import torch

from placerank.options import split_key_values

WS_MINERS = ("official", "relative")
WS_CELLS = ("official", "center")

# Loss settings of the CNN adaptation (measured in docs/fol.md "Local heads on a CNN"): the
# relative miner, the patch-centre up-conv cell (4r, 4c) — the cell the CNN's test-time ``pool3``
# feature is pooled around — and more pairs per image. The loss weights stay official: raising
# them (ws_scale=1, local_margin=0.05) gave the local terms 4x the MS gradient but lowered
# held-out fol-region R@1 from 0.825 to 0.625 after 150 steps (docs/fol.md), so they are options.
CNN_LOSS_DEFAULTS: dict[str, Any] = {
    "ws_miner": "relative",
    "ws_cells": "center",
    "ws_drop_first_anchor": False,
    "ws_max_per_image": 32,
}


def adapt_loss_config(cfg, model_name: str, explicit: Mapping[str, Any] | Iterable[str] = ()):
    """``cfg`` with :data:`CNN_LOSS_DEFAULTS` applied when ``model_name`` is not a DINOv2 FoL
    (``fol-vit*``), except for the keys in ``explicit`` (the ``--option`` keys the user gave).
    The official backbones get ``cfg`` unchanged (fidelity to the official code)."""
    if str(model_name).startswith("fol-vit"):
        return cfg
    given = set(explicit.keys() if isinstance(explicit, Mapping) else split_key_values(explicit))
    names = {f.name for f in fields(cfg)}
    changes = {k: v for k, v in CNN_LOSS_DEFAULTS.items() if k in names and k not in given}
    return replace(cfg, **changes)


@torch.no_grad()
def mine_relative(
    feat_i: torch.Tensor,
    feat_j: torch.Tensor,
    plan_i: torch.Tensor,
    plan_j: torch.Tensor,
    attn_i: torch.Tensor,
    cfg,
) -> list[tuple[int, int, float]]:
    """Patch pairs (a in i, b in j, cos) of one image pair, relative rules (module docstring).

    ``feat_*`` (C, N) L2-normalised, ``plan_*`` (K, N), ``attn_i`` (N,) = Ã_i. Anchors are the
    patches with Ã_i > ``ws_anchor_threshold`` (as officially); pairs sorted by cosine, at most
    ``ws_max_per_image``."""
    N = feat_j.shape[1]
    anchors = torch.nonzero(attn_i > cfg.ws_anchor_threshold, as_tuple=False).squeeze(1)
    if cfg.ws_drop_first_anchor:
        anchors = anchors[1:]
    if anchors.numel() == 0 or N < 2:
        return []
    m = min(N, max(2, math.ceil(cfg.ws_candidate_fraction * N)))
    rows = torch.zeros(plan_j.shape[0], N, dtype=torch.bool, device=plan_j.device)
    rows.scatter_(1, plan_j.topk(m, dim=1).indices, True)  # top-m patches of each cluster row
    cand = rows[plan_i[:, anchors].argmax(dim=0)]  # (A, N)
    sim = feat_i.t() @ feat_j  # (N_i, N_j)
    cos = torch.where(cand, sim[anchors], torch.full_like(sim[anchors], -10.0))
    s1, best = cos.max(dim=1)
    ok = (s1 > cfg.ws_mutual_min_cos) & (sim.argmax(dim=0)[best] == anchors)
    keep = torch.nonzero(ok, as_tuple=False).squeeze(1)
    keep = keep[s1[keep].argsort(descending=True)][: cfg.ws_max_per_image]
    return [(int(anchors[k]), int(best[k]), float(s1[k])) for k in keep.tolist()]


def centre_cells(r: torch.Tensor, c: torch.Tensor, local_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Up-conv cell (4r, 4c) of patch (r, c): the cell written by the patch's centre tap alone."""
    Hl, Wl = local_grid
    return (4 * r).clamp(0, Hl - 1), (4 * c).clamp(0, Wl - 1)


# ---------------------------------------------------------------------------------------------
# Gradient shares of the loss terms
# ---------------------------------------------------------------------------------------------


def shared_parameters(model, max_tensors: int = 6) -> list[torch.nn.Parameter]:
    """The last ``max_tensors`` trainable weight tensors (ndim >= 2) of the backbone: the last
    trainable block, which every loss term reaches (global through the aggregator, local through
    the up-conv head). A few tensors keep :func:`term_grad_norms` cheap."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    params = [p for p in model.backbone.parameters() if p.requires_grad and p.ndim >= 2]
    return params[-max_tensors:]


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The up-conv local head's weights (reached only by the local terms)."""
    model = getattr(model, "module", model)
    return [p for p in (model.upconv.weight, model.upconv2.weight) if p.requires_grad]


def _norm(grads: Sequence[torch.Tensor | None]) -> float:
    sq = [float(g.detach().float().pow(2).sum()) for g in grads if g is not None]
    return math.sqrt(sum(sq)) if sq else 0.0


def term_grad_norms(
    terms: Mapping[str, torch.Tensor], shared: Sequence[torch.Tensor], head: Sequence[torch.Tensor] = ()
) -> dict[str, float]:
    """``{"grad_<term>": |∂term/∂shared|, "grad_head_<term>": |∂term/∂head|}`` for each weighted
    loss term, by ``torch.autograd.grad`` with the graph retained (the step's backward follows).
    Terms without a graph (e.g. no mined pair) get 0. Skipped ({}) under torch.distributed with
    more than one process: DDP's gradient hooks expect one backward per step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return {}
    params = list(shared) + list(head)
    out: dict[str, float] = {}
    for name, t in terms.items():
        if not (isinstance(t, torch.Tensor) and t.requires_grad) or not params:
            out[f"grad_{name}"] = 0.0
            if head:
                out[f"grad_head_{name}"] = 0.0
            continue
        g = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        out[f"grad_{name}"] = round(_norm(g[: len(shared)]), 6)
        if head:
            out[f"grad_head_{name}"] = round(_norm(g[len(shared) :]), 6)
    return out
