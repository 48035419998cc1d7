"""Batched mutual-nearest-neighbour counting for re-ranking (SelaVPR dense, FoL regions).

The query's features are compared with each candidate's using ``bmm`` over chunks of
candidates, so memory is bounded by ``chunk`` x n_q x n_c similarities whatever K is. Features
stored as float16 are upcast to float32 before the matrix product (fp16 ties can flip a match).
Padding rows are handled by passing variable-length sets: candidates are padded with zeros per
chunk and padded rows/columns can never be mutual (their similarity is masked to -inf).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def mnn_counts(
    query: np.ndarray | torch.Tensor,
    candidates: Sequence[np.ndarray | torch.Tensor],
    threshold: float | None = None,
    chunk: int = 8,
    device: torch.device | str = "cpu",
    min_matches: int = 0,
) -> np.ndarray:
    """Number of mutual nearest neighbours (optionally with cosine > ``threshold``) between the
    query set (n_q, D) and each candidate set (n_c, D). Returns int64 (K,).

    ``min_matches``: counts below it become 0 (SelaVPR/FoL score exactly one match as 0; pass 2
    to reproduce that quirk).
    """
    device = torch.device(device)
    q = torch.as_tensor(np.asarray(query) if not torch.is_tensor(query) else query).to(device, torch.float32)
    out = np.zeros(len(candidates), dtype=np.int64)
    if q.shape[0] == 0:
        return out
    for start in range(0, len(candidates), chunk):
        block = [
            torch.as_tensor(np.asarray(c) if not torch.is_tensor(c) else c) for c in candidates[start : start + chunk]
        ]
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
        if threshold is not None:
            sim = torch.gather(S, 1, best_c_for_q[:, None, :]).squeeze(1)
            mutual &= sim > threshold
        counts = mutual.sum(dim=1).cpu().numpy().astype(np.int64)
        counts[counts < min_matches] = 0
        counts[(lens == 0).cpu().numpy()] = 0  # an empty candidate has no matches (argmax of -inf is 0)
        out[start : start + len(block)] = counts
    return out
