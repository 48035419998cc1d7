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
- :func:`k_reciprocal_rerank_all` (one set of items, each once: OpenIBL's all training queries +
  database) / :func:`k_reciprocal_rerank` (query/gallery form) + :func:`select_difficult_positives`:
  the difficult positives are the positives whose rank improves (or stays) under Zhong et al.'s
  k-reciprocal Jaccard re-ranking (k1 = 20, k2 = 1, lambda = 0.1), biggest improvement first.
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


def _top_ranks(dist: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    """(N, min(k, N)): each row's k nearest items, nearest first (a stable sort: ties by index),
    sorted a block of rows at a time so no (N, N) index matrix is held."""
    k = min(k, dist.shape[1])
    out = np.empty((dist.shape[0], k), dtype=np.int64)
    for s in range(0, dist.shape[0], block):
        out[s : s + block] = np.argsort(dist[s : s + block], axis=1, kind="stable")[:, :k]
    return out


def k_reciprocal_sets(top: np.ndarray, k: int) -> list[np.ndarray]:
    """R(i) for every item: the j in i's top-(k+1) (itself included) that also have i in their
    top-(k+1). ``top``: (N, >= k+1) nearest-first ranks, e.g. from :func:`_top_ranks`."""
    fwd = top[:, : k + 1]
    back = (fwd[fwd] == np.arange(len(top))[:, None, None]).any(axis=2)  # i in fwd[j]?
    return [fwd[i][back[i]] for i in range(len(top))]


def k_reciprocal_rerank_all(
    dist: np.ndarray, rows: np.ndarray, k1: int = 20, k2: int = 1, lambda_value: float = 0.1
) -> np.ndarray:
    """Zhong et al.'s re-ranked distance (len(rows), N) over ONE set of N items, each present once
    (OpenIBL: all training queries and database images), read at ``rows``.

    1. ``dist`` (N, N) squared and each column divided by its maximum (then read row-wise): d~.
    2. R(i) = k1-reciprocal neighbours of i; R*(i) = R(i) plus, for each c in R(i), c's
       round(k1/2)-reciprocal set when more than 2/3 of it lies in R(i).
    3. V[i, j] = exp(-d~[i, j]) over R*(i), normalised to sum 1 (query expansion over the k2
       nearest when k2 > 1).
    4. Jaccard(i, j) = 1 - sum_k min(V_ik, V_jk) / sum_k max(V_ik, V_jk).
    5. final = (1 - lambda) Jaccard + lambda d~.

    Memory: one (N, N) float64 copy of ``dist``; V is sparse (|R*(i)| entries a row).
    """
    from scipy import sparse

    rows = np.asarray(rows, dtype=np.int64)
    n = dist.shape[0]
    d = np.array(dist, dtype=np.float64)  # one copy, then in place (N x N can be large)
    np.square(d, out=d)
    d /= np.maximum(d.max(axis=0, keepdims=True), 1e-12)
    d = d.T  # d~ (row i: column i of the squared distances / its maximum)
    half = int(np.round(k1 / 2.0))
    top = _top_ranks(d, max(k1 + 1, k2))
    recip, recip_half = k_reciprocal_sets(top, k1), k_reciprocal_sets(top, half)
    ind, val, ptr = [], [], [0]
    for i in range(n):
        r_i = recip[i]
        parts = [r_i]
        for c in r_i:
            r_c = recip_half[c]
            if np.isin(r_c, r_i).sum() > 2.0 / 3.0 * len(r_c):
                parts.append(r_c)
        idx = np.unique(np.concatenate(parts))
        wts = np.exp(-d[i, idx])
        ind.append(idx)
        val.append(wts / wts.sum())
        ptr.append(ptr[-1] + len(idx))
    V = sparse.csr_matrix((np.concatenate(val), np.concatenate(ind), np.asarray(ptr)), shape=(n, n))
    if k2 != 1:
        expand = sparse.csr_matrix(
            (np.full(n * k2, 1.0 / k2), top[:, :k2].ravel(), np.arange(0, n * k2 + 1, k2)), shape=(n, n)
        )
        V = (expand @ V).tocsr()
    Vc = V.tocsc()  # inverted index: column j lists the rows that use item j
    final = np.empty((len(rows), n), dtype=np.float64)
    for r, i in enumerate(rows):
        s, e = V.indptr[i], V.indptr[i + 1]
        cols, vi = V.indices[s:e], V.data[s:e]
        starts, stops = Vc.indptr[cols], Vc.indptr[cols + 1]
        take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(cols) else np.zeros(0, int)
        mine = np.repeat(vi, stops - starts)
        common = np.bincount(Vc.indices[take], weights=np.minimum(mine, Vc.data[take]), minlength=n)
        final[r] = (1.0 - lambda_value) * (1.0 - common / (2.0 - common)) + lambda_value * d[i]
    return final


def k_reciprocal_rerank(
    q_g: np.ndarray, q_q: np.ndarray, g_g: np.ndarray, k1: int = 20, k2: int = 1, lambda_value: float = 0.1
) -> np.ndarray:
    """Zhong et al.'s re-ranked distance (Q, G) from query-gallery, query-query and
    gallery-gallery distances: :func:`k_reciprocal_rerank_all` over the Q + G items (queries
    first), query rows, gallery columns."""
    Q = q_g.shape[0]
    dist = np.concatenate([np.concatenate([q_q, q_g], axis=1), np.concatenate([q_g.T, g_g], axis=1)], axis=0)
    return k_reciprocal_rerank_all(dist, np.arange(Q), k1=k1, k2=k2, lambda_value=lambda_value)[:, Q:]


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
