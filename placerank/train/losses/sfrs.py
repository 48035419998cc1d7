"""SFRS losses and self-supervised labels (Ge et al., ECCV 2020), written from the spec.

- :func:`sare_ind_loss`: SARE "individual" hard loss, one positive against each negative
  separately, dot products over a temperature (SFRS: tau = 0.07) or negative squared Euclidean
  distances (the NetVLAD/SARE baselines).
- :func:`regions_from_quarters`: the 9 descriptors of an image (global, 4 halves, 4 quarters)
  from its *unnormalised* quarter VLADs; halves and the global one are sums of quarters and every
  one is normalised only afterwards (VLAD is additive over locations, so the global descriptor is
  exactly the whole-image VLAD).
- :func:`image_to_region_similarities`, :func:`hardest_region_negatives`: the anchor's global
  descriptor against the 9 regions of another image; in generations >= 1 each negative is
  represented by its most similar region (argmax without gradient).
- :func:`soft_region_loss`: cross-entropy between the teacher's and the student's *joint* softmax
  over all difficult positives x 9 regions (one distribution, not one per positive).
- :func:`teacher_temperature`: the per-generation teacher temperature (0.07, 0.06, 0.05 ...).
- :func:`k_reciprocal_rerank` + :func:`select_difficult_positives`: the difficult positives are
  the positives whose rank improves (or stays) under Zhong et al.'s k-reciprocal Jaccard
  re-ranking (k1 = 20, k2 = 1, lambda = 0.1), biggest improvement first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from placerank.models.sfrs_regions import REGION_NAMES, quarter_masks, regions_from_quarters  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Hard loss
# ---------------------------------------------------------------------------------------------


def pair_logits(
    anchor: torch.Tensor, others: torch.Tensor, temperature: float, similarity: str = "dot"
) -> torch.Tensor:
    """Logits of ``anchor`` (..., D) against ``others`` (..., N, D): ``<a, o> / tau`` or
    ``-|a - o|^2 / tau``; shape (..., N)."""
    if similarity == "dot":
        return torch.einsum("...d,...nd->...n", anchor, others) / temperature
    if similarity == "euclidean":
        return -((anchor.unsqueeze(-2) - others) ** 2).sum(-1) / temperature
    raise ValueError(f"similarity must be 'dot' or 'euclidean', got '{similarity}'")


def sare_ind_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    similarity: str = "dot",
) -> torch.Tensor:
    """SARE-individual: mean over tuples and negatives j of
    ``-log(e^{s_p} / (e^{s_p} + e^{s_nj}))`` = ``softplus(s_nj - s_p)``.

    ``anchor``, ``positive`` (B, D) or (D,); ``negatives`` (B, N, D) or (N, D).
    """
    s_p = pair_logits(anchor, positive.unsqueeze(-2), temperature, similarity)  # (..., 1)
    s_n = pair_logits(anchor, negatives, temperature, similarity)  # (..., N)
    return F.softplus(s_n - s_p).mean()


# ---------------------------------------------------------------------------------------------
# Regions
# ---------------------------------------------------------------------------------------------


def image_to_region_similarities(anchor: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``<f0(q), f^r(I)>`` for anchor (D,) and regions (M, 9, D) -> (M, 9)."""
    return regions @ anchor


def hardest_region_negatives(anchor: torch.Tensor, neg_regions: torch.Tensor) -> torch.Tensor:
    """Each negative (N, 9, D) represented by its region most similar to ``anchor`` (D,) -> (N, D);
    the choice is made without gradient, the chosen descriptor keeps its gradient."""
    with torch.no_grad():
        best = image_to_region_similarities(anchor, neg_regions).argmax(dim=1)
    return neg_regions[torch.arange(neg_regions.shape[0], device=neg_regions.device), best]


# ---------------------------------------------------------------------------------------------
# Soft loss
# ---------------------------------------------------------------------------------------------


def soft_region_loss(
    s_student: torch.Tensor, s_teacher: torch.Tensor, tau_student: float = 0.07, tau_teacher: float = 0.07
) -> torch.Tensor:
    """``-sum_m p^T_m log p^S_m`` with p = softmax over *all* (positive, region) entries jointly.

    ``s_student``/``s_teacher``: (M, 9) for one tuple or (B, M, 9) (averaged over B).
    """
    flat_s = s_student.flatten(-2) / tau_student
    flat_t = s_teacher.detach().flatten(-2) / tau_teacher
    loss = -(F.softmax(flat_t, dim=-1) * F.log_softmax(flat_s, dim=-1)).sum(-1)
    return loss.mean()


def teacher_temperature(generation: int, temperatures: Sequence[float] = (0.07, 0.07, 0.06, 0.05)) -> float:
    """Teacher temperature of ``generation`` (``temperatures[g]``; later generations keep the
    last value). Generation 0 has no teacher; it returns ``temperatures[0]``."""
    if generation < 0:
        raise ValueError("generation must be >= 0")
    return float(temperatures[min(generation, len(temperatures) - 1)])


# ---------------------------------------------------------------------------------------------
# Difficult positives: k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# ---------------------------------------------------------------------------------------------


def _reciprocal_sets(rank: np.ndarray, k: int) -> np.ndarray:
    """Boolean (N, N): j is in i's k-reciprocal set (each is in the other's top-(k+1))."""
    n = rank.shape[0]
    knn = np.zeros((n, n), dtype=bool)
    knn[np.repeat(np.arange(n), min(k + 1, n)), rank[:, : k + 1].ravel()] = True
    return knn & knn.T


def k_reciprocal_rerank(
    q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int = 20, k2: int = 1, lambda_value: float = 0.1
) -> np.ndarray:
    """Zhong et al.'s re-ranked distance (Q, G) from query-gallery, query-query and
    gallery-gallery distances.

    1. All Q + G items, distance d squared and each column divided by its maximum (then read
       row-wise): ``d~``.
    2. R(i) = k1-reciprocal neighbours of i; R*(i) = R(i) plus, for each c in R(i), c's
       round(k1/2)-reciprocal set when more than 2/3 of it lies in R(i).
    3. V[i, j] = exp(-d~[i, j]) over R*(i), normalised to sum 1 (query expansion over the k2
       nearest when k2 > 1).
    4. Jaccard(i, j) = 1 - sum_k min(V_ik, V_jk) / sum_k max(V_ik, V_jk).
    5. final = (1 - lambda) Jaccard + lambda d~.
    """
    Q, G = q_g.shape
    dist = np.concatenate([np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    dist = np.asarray(dist, dtype=np.float64) ** 2
    dist = (dist / np.maximum(dist.max(axis=0, keepdims=True), 1e-12)).T
    n = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")
    recip = _reciprocal_sets(rank, k1)
    half = int(np.round(k1 / 2.0))
    recip_half = _reciprocal_sets(rank, half)
    V = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        r_i = recip[i]
        expanded = r_i.copy()
        for c in np.flatnonzero(r_i):
            r_c = recip_half[c]
            size = r_c.sum()
            if (r_c & r_i).sum() > 2.0 / 3.0 * size:
                expanded |= r_c
        idx = np.flatnonzero(expanded)
        wts = np.exp(-dist[i, idx])
        V[i, idx] = wts / wts.sum()
    if k2 != 1:
        V = V[rank[:, :k2]].mean(axis=1)
    holders = [np.flatnonzero(V[:, j]) for j in range(n)]  # inverted index: rows using item j
    jaccard = np.zeros((Q, n), dtype=np.float64)
    for i in range(Q):
        common = np.zeros(n, dtype=np.float64)
        for j in np.flatnonzero(V[i]):
            rows = holders[j]
            common[rows] += np.minimum(V[i, j], V[rows, j])
        jaccard[i] = 1.0 - common / (2.0 - common)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:Q]
    return final[:, Q:]


def select_difficult_positives(pool: np.ndarray, reranked_dist: np.ndarray | None, pos_num: int) -> np.ndarray:
    """The difficult positives of one query.

    ``pool``: positive ids ordered by the original (Euclidean) distance, nearest first;
    ``reranked_dist``: their re-ranked distances (same order), or None in generation 0 (then the
    first ``pos_num`` of the pool). Keeps positives whose rank improved (biggest improvement
    first), then those whose rank is unchanged (in re-ranked order); worse ones are dropped.
    """
    pool = np.asarray(pool)
    if reranked_dist is None:
        return pool[:pos_num]
    new_order = np.argsort(np.asarray(reranked_dist), kind="stable")
    new_rank = np.empty(len(pool), dtype=np.int64)
    new_rank[new_order] = np.arange(len(pool))
    gap = new_rank - np.arange(len(pool))
    improved = np.flatnonzero(gap < 0)
    improved = improved[np.lexsort((new_rank[improved], gap[improved]))]
    same = np.flatnonzero(gap == 0)
    same = same[np.argsort(new_rank[same], kind="stable")]
    return pool[np.concatenate([improved, same])][:pos_num]
