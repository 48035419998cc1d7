"""The one mutual-nearest-neighbour module, used by the re-rankers and the training losses alike.

Two feature sets match at (i, j) when j is i's nearest neighbour and i is j's (cosine similarity
of unit vectors). Float16 inputs are upcast to float32 before any product (fp16 ties can flip a
match).

- :func:`mutual_nn_indices`: (i, j) of a similarity matrix, optionally with similarity > threshold.
- :func:`mutual_nn_pairs`: (P, 2) pairs of two descriptor sets (RANSAC's putative matches).
- :func:`mnn_mean_similarity`: mean cosine of the mutual pairs, with gradient (SelaVPR / FoL losses).
- :func:`mnn_counts` (batched ``bmm``, any device) and :func:`mnn_counts_cpu` (one GEMM + numpy
  argmaxes): the number of mutual pairs between a query set and each candidate set (re-ranking
  scores); they give the same counts (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def mutual_nn_indices(sim: torch.Tensor, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row/column indices (i, j) of mutual nearest neighbours in ``sim`` (n, m).

    With ``threshold``, only pairs whose similarity is strictly greater are kept. The selection
    is not differentiated.
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


def mutual_nn_pairs(
    desc1: np.ndarray | torch.Tensor, desc2: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """(P, 2) int64 index pairs (i in desc1, j in desc2) that are each other's nearest
    neighbour by cosine similarity, in increasing i.

    Both directions are read from one similarity matrix S = desc1 @ desc2.T; on ties the first
    index wins (``argmax``). On CPU that is one matrix product and numpy reductions
    (:func:`_mutual_nn_pairs_cpu`, ~2.5x faster than two products and torch's argmaxes on
    2048 x 2048 XFeat sets); on other devices torch's (:func:`mutual_nn_indices`)."""
    if len(desc1) == 0 or len(desc2) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    device = torch.device(device)
    a = _tensor(desc1).to(device, torch.float32)
    b = _tensor(desc2).to(device, torch.float32)
    if device.type == "cpu":
        return _mutual_nn_pairs_cpu(torch.mm(a, b.t()).numpy())
    i, j = mutual_nn_indices(a @ b.t())
    return torch.stack([i, j], dim=1).cpu().numpy().astype(np.int64)


def _mutual_nn_pairs_cpu(sim: np.ndarray) -> np.ndarray:
    """Mutual nearest neighbours of a C-contiguous float32 (n, m) matrix, without a
    column-wise argmax (a strided scan, ~15x slower than the row-wise one in numpy and torch).

    Row i is mutual with j = argmax(sim[i]) when sim[i, j] is column j's maximum and no earlier
    row reaches it. Column maxima are a contiguous ``max(axis=0)``; a second one, over the matrix
    with each such (i, j) knocked out, finds the columns whose maximum another row ties, and
    only those (rare: exact float ties) are scanned. ``sim`` is modified in place."""
    rows = np.arange(sim.shape[0])
    nn12 = sim.argmax(axis=1)
    col_max = sim.max(axis=0)
    at_max = sim[rows, nn12] == col_max[nn12]
    i, j = rows[at_max], nn12[at_max]
    sim[i, j] = -np.inf
    keep = sim.max(axis=0)[j] < col_max[j]  # no row outside i reaches column j's maximum
    sim[i, j] = col_max[j]
    for k in np.flatnonzero(~keep):  # a tie with a row whose own nearest neighbour is elsewhere
        keep[k] = int(np.argmax(sim[:, j[k]] == col_max[j[k]])) == i[k]
    i, j = i[keep], j[keep]
    _, first = np.unique(j, return_index=True)  # rows tied among themselves: the first one wins
    first.sort()
    return np.stack([i[first], j[first]], axis=1).astype(np.int64)


def mnn_mean_similarity(f: torch.Tensor, g: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Mean cosine of the mutual-NN pairs of unit-vector sets f (n, D), g (m, D), with gradient:
    the training similarity of the official SelaVPR / FoL ``match_batch_tensor``.

    The n x m similarity matrix is computed without autograd (it only selects the pairs); the
    selected pairs' dot products are recomputed with gradients, so the backward pass costs
    O(|M| D), not two more n x m x D products. Value and gradient equal those of
    ``(f @ g.t())[i, j].mean()`` (tested). Edge cases, as the official code behaves:

    - exactly one mutual pair *before* the threshold (the official index tensor is then 0-d, a
      quirk): the mean of ``f_k . g_k`` over the common index range, with gradient (SelaVPR,
      threshold None: ``|M| = 1``; ``M`` is never empty for non-empty sets);
    - with ``threshold`` (FoL, 0.7): the mean over the pairs with cosine > threshold; one
      surviving pair gives its cosine; **none gives NaN** (the official mean of an empty set), a
      constant with no graph so the caller can drop the term
      (:func:`placerank.train.losses.fol.local_triplet_loss` does);
    - an empty set: NaN (no pair exists).
    """
    nan = torch.full((), float("nan"), dtype=torch.float32, device=f.device)
    if f.shape[0] == 0 or g.shape[0] == 0:
        return nan
    with torch.no_grad():
        sim = f.detach() @ g.detach().t()
        i, j = mutual_nn_indices(sim)
        single = i.numel() <= 1
        if not single and threshold is not None:
            keep = sim[i, j] > threshold
            i, j = i[keep], j[keep]
    if single:
        n = min(f.shape[0], g.shape[0])
        return (f[:n] * g[:n]).sum(dim=1).mean()
    if i.numel() == 0:
        return nan
    return (f[i] * g[j]).sum(dim=1).mean()


def mnn_counts(
    query: np.ndarray | torch.Tensor,
    candidates: Sequence[np.ndarray | torch.Tensor],
    threshold: float | None = None,
    chunk: int = 8,
    device: torch.device | str = "cpu",
    min_matches: int = 0,
    single_pair_zero: bool = False,
) -> np.ndarray:
    """Number of mutual nearest neighbours (optionally with cosine > ``threshold``) between the
    query set (n_q, D) and each candidate set (n_c, D). Returns int64 (K,).

    Candidates are compared ``chunk`` at a time with one ``bmm``, zero-padded per chunk; padded
    rows are masked to -inf so they can never be mutual. ``min_matches``: counts below it become
    0. ``single_pair_zero``: a candidate with exactly ONE mutual pair *before* the threshold
    scores 0, whatever that pair's cosine (the official SelaVPR / FoL ``match_batch_tensor``: its
    index tensor is then 0-d and skips both the threshold and the count). Without a threshold
    this equals ``min_matches=2`` (SelaVPR); with FoL's 0.7 a pair surviving alone out of two or
    more still counts 1.
    """
    device = torch.device(device)
    q = _tensor(query).to(device, torch.float32)
    out = np.zeros(len(candidates), dtype=np.int64)
    if q.shape[0] == 0:
        return out
    for start in range(0, len(candidates), chunk):
        block = [_tensor(c) for c in candidates[start : start + chunk]]
        lens = torch.tensor([b.shape[0] for b in block], device=device)
        n_max = int(lens.max().item()) if len(block) else 0
        if n_max == 0:
            continue
        C = torch.zeros(len(block), n_max, q.shape[1], device=device)
        for b, c in enumerate(block):
            if c.shape[0]:
                C[b, : c.shape[0]] = c.to(device, torch.float32)
        S = torch.bmm(C, q.t().unsqueeze(0).expand(len(block), -1, -1))  # (b, n_c, n_q)
        valid = torch.arange(n_max, device=device)[None, :] < lens[:, None]  # (b, n_c)
        S = S.masked_fill(~valid[:, :, None], float("-inf"))
        best_c_for_q = S.argmax(dim=1)  # (b, n_q): candidate row per query column
        best_q_for_c = S.argmax(dim=2)  # (b, n_c): query column per candidate row
        back = torch.gather(best_q_for_c, 1, best_c_for_q)  # (b, n_q)
        mutual = back == torch.arange(q.shape[0], device=device)[None, :]
        single = (mutual.sum(dim=1) == 1).cpu().numpy()
        if threshold is not None:
            sim = torch.gather(S, 1, best_c_for_q[:, None, :]).squeeze(1)
            mutual &= sim > threshold
        counts = mutual.sum(dim=1).cpu().numpy().astype(np.int64)
        counts[counts < min_matches] = 0
        if single_pair_zero:
            counts[single] = 0
        counts[(lens == 0).cpu().numpy()] = 0  # an empty candidate has no matches (argmax of -inf is 0)
        out[start : start + len(block)] = counts
    return out


def mnn_counts_cpu(
    query: np.ndarray,
    candidates: Sequence[np.ndarray],
    threshold: float | None = 0.7,
    min_matches: int = 0,
    max_chunk_mb: float = 256.0,
    single_pair_zero: bool = False,
) -> np.ndarray:
    """CPU scorer with the counts of :func:`mnn_counts` (tested).

    A chunk of candidates is one zero-padded (k * n_max, D) x (D, n_q) GEMM; the row/column
    argmaxes run in numpy, which on CPU is ~10x faster than torch's threaded reductions on these
    small (k, 225, 225) arrays. Padded rows are masked to -inf, empty candidates score 0.
    """
    q = np.asarray(query, dtype=np.float32)
    n_q = q.shape[0]
    out = np.zeros(len(candidates), dtype=np.int64)
    if n_q == 0 or not len(candidates):
        return out
    qt_t = torch.from_numpy(np.ascontiguousarray(q.T))
    lens = np.array([len(c) for c in candidates])
    n_max = max(1, int(lens.max()))
    chunk = max(1, int(max_chunk_mb * 2**20 // (n_max * n_q * 4)))
    cols = np.arange(n_q)
    for start in range(0, len(candidates), chunk):
        block = candidates[start : start + chunk]
        bl = lens[start : start + len(block)]
        m = int(bl.max())
        if m == 0:
            continue
        if (bl == m).all():
            C = np.stack([np.asarray(c) for c in block]).astype(np.float32, copy=False)
        else:
            C = np.zeros((len(block), m, q.shape[1]), np.float32)
            for b, c in enumerate(block):
                C[b, : len(c)] = c
        S = torch.mm(torch.from_numpy(C.reshape(-1, q.shape[1])), qt_t).numpy().reshape(len(block), m, n_q)
        if not (bl == m).all():
            S[np.arange(m)[None, :] >= bl[:, None]] = -np.inf
        best_q = S.argmax(axis=2)  # (k, m): query column per candidate row
        best_c = S.argmax(axis=1)  # (k, n_q): candidate row per query column
        mutual = np.take_along_axis(best_q, best_c, axis=1) == cols[None, :]
        single = mutual.sum(axis=1) == 1
        if threshold is not None:
            sim = np.take_along_axis(S, best_c[:, None, :], axis=1)[:, 0, :]
            mutual &= sim > threshold
        counts = mutual.sum(axis=1)
        counts[bl == 0] = 0
        if single_pair_zero:
            counts[single] = 0
        out[start : start + len(block)] = counts
    out[out < min_matches] = 0
    return out


def mutual_pairs_array(
    query: np.ndarray, candidate: np.ndarray, threshold: float | None = None, device: torch.device | str = "cpu"
) -> np.ndarray:
    """(P, 2) int64 (query index, candidate index) of the mutual NNs :func:`mnn_counts` counts
    (for match pictures of the FoL / SelaVPR re-rankers)."""
    if len(query) == 0 or len(candidate) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    q = _tensor(query).to(device, torch.float32)
    c = _tensor(candidate).to(device, torch.float32)
    i, j = mutual_nn_indices(q @ c.t(), threshold)
    return torch.stack([i, j], dim=1).cpu().numpy().astype(np.int64)
