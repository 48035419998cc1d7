"""Mutual-nearest-neighbour similarity between two local feature sets (training side).

Used by SelaVPR's local loss (no threshold) and FoL's local loss (cosine > 0.7). The argmax
selection is not differentiated; gradients flow through the dot products of the selected pairs.
"""

from __future__ import annotations

import torch


def mutual_nn_pairs(sim: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices (i, j) of mutual nearest neighbours in ``sim`` (n, m).

    With ``threshold``, only pairs whose similarity is strictly greater are kept.
    """
    with torch.no_grad():
        nn12 = sim.argmax(dim=1)  # best column per row
        nn21 = sim.argmax(dim=0)  # best row per column
        rows = torch.arange(sim.shape[0], device=sim.device)
        mutual = nn21[nn12] == rows
        if threshold is not None:
            mutual &= sim[rows, nn12] > threshold
        i = rows[mutual]
        j = nn12[mutual]
    return i, j


def mnn_mean_similarity(f: torch.Tensor, g: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Mean cosine of the mutual-NN pairs between unit-vector sets f (n, D) and g (m, D).

    Fallback when at most one pair survives (the official code's quirk): the mean of
    ``f_k . g_k`` over the common index range, which keeps a gradient path.
    """
    sim = f @ g.t()
    i, j = mutual_nn_pairs(sim, threshold)
    if i.numel() <= 1:
        n = min(f.shape[0], g.shape[0])
        return (f[:n] * g[:n]).sum(dim=1).mean()
    return sim[i, j].mean()
