"""SelaVPR's training loss (spec §3): global triplet + mutual-nearest-neighbour local loss.

A batch holds B tuples (query, positive, n negatives); every (q, p, n_j) is a triplet.

- Global: ``L_g = sum_triplets max(0, ||g_q - g_p|| - ||g_q - g_n|| + m) / (B n)``, m = 0.1,
  with PyTorch ``triplet_margin_loss`` semantics (its pairwise distance adds eps = 1e-6).
- Local: ``L_l = sum_triplets max(0, sim(Q, N) - sim(Q, P)) / (B n)`` where ``sim`` is the mean
  cosine of the mutual-nearest-neighbour pairs between two dense feature sets
  (:func:`placerank.rerank.mutual_nn.mnn_mean_similarity`; the argmax selection is not
  differentiated, gradients flow through the selected dot products).
- Total: ``L = L_g + local_weight * L_l`` (official weight 1, local margin 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from placerank.rerank.mutual_nn import mnn_mean_similarity


@dataclass(frozen=True)
class SelaVPRLossConfig:
    margin: float = 0.1  # global triplet margin
    local_margin: float = 0.0  # local hinge margin (official: 0)
    local_weight: float = 1.0  # weight of the local loss (official: 1)


def global_triplet_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """q, p: (B, D); n: (B, k, D) -> scalar mean over the B*k triplets."""
    B, k, D = n.shape
    qa = q[:, None, :].expand(B, k, D).reshape(B * k, D)
    pa = p[:, None, :].expand(B, k, D).reshape(B * k, D)
    total = F.triplet_margin_loss(qa, pa, n.reshape(B * k, D), margin=margin, p=2, reduction="sum")
    return total / (B * k)


def local_mnn_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Dense local features, channels last: q, p (B, N, C); n (B, k, N, C) -> scalar.

    Per triplet ``max(0, sim(Q, N) - sim(Q, P) + margin)``, averaged over the B*k triplets.
    """
    B, k = n.shape[:2]
    total = q.new_zeros(())
    for b in range(B):
        s_pos = mnn_mean_similarity(q[b], p[b])
        for j in range(k):
            s_neg = mnn_mean_similarity(q[b], n[b, j])
            total = total + F.relu(s_neg - s_pos + margin)
    return total / (B * k)


def dense_to_sets(dense: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) up-conv output -> (B, h*w, C) feature sets (row-major cells)."""
    return dense.flatten(2).transpose(1, 2)


def selavpr_loss(
    global_desc: torch.Tensor, dense: torch.Tensor, num_negatives: int, config: SelaVPRLossConfig = SelaVPRLossConfig()
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch laid out tuple by tuple: rows ``t*(2+k) + [0, 1, 2..]`` are
    (query, positive, negatives) of tuple t. ``global_desc`` (B(2+k), D); ``dense``
    (B(2+k), C, h, w). Returns (total, {"global": .., "local": .., "loss": ..})."""
    k = int(num_negatives)
    T = 2 + k
    if global_desc.shape[0] % T:
        raise ValueError(f"batch of {global_desc.shape[0]} images is not a whole number of {T}-image tuples")
    B = global_desc.shape[0] // T
    g = global_desc.reshape(B, T, -1)
    lg = global_triplet_loss(g[:, 0], g[:, 1], g[:, 2:], config.margin)
    sets = dense_to_sets(dense)
    sets = sets.reshape(B, T, sets.shape[1], sets.shape[2])
    ll = local_mnn_loss(sets[:, 0], sets[:, 1], sets[:, 2:], config.local_margin)
    total = lg + config.local_weight * ll
    return total, {"loss": float(total.detach()), "global": float(lg.detach()), "local": float(ll.detach())}
