"""SFRS tuple mining (spec §4): easiest positive, hard negatives with a per-anchor cache, and
difficult positives re-ranked by k-reciprocal Jaccard distance in generations >= 1."""

from __future__ import annotations

import numpy as np
import torch

from placerank.train.losses.sfrs import k_reciprocal_rerank, k_reciprocal_rerank_all, select_difficult_positives
from placerank.train.sfrs_data import SFRSData
from placerank.train.sfrs_options import SFRSOptions


class SFRSMiner:
    """Mines tuples for chunks of anchors; ``neg_cache`` keeps each anchor's last negatives
    (they stay candidates at its next visit) and is saved with the checkpoint."""

    def __init__(self, data: SFRSData, opts: SFRSOptions):
        self.data, self.opts = data, opts
        self.neg_cache: dict[int, np.ndarray] = {}

    def mine(self, feats: torch.Tensor, chunk: np.ndarray, gen: int, rng: np.random.Generator) -> list[dict]:
        """Tuples for the anchors in ``chunk`` from the current features (identical on all ranks)."""
        o, data = self.opts, self.data
        f = feats.float()
        dist = (2.0 - 2.0 * (f[torch.as_tensor(chunk)] @ f.T)).clamp_min(0).double().numpy()  # squared L2
        tuples = []
        pools = []
        for r, q in enumerate(chunk):
            pos = data.positives[q]
            order = np.argsort(dist[r, pos], kind="stable")
            pools.append(pos[order[: o.pos_pool]])
            cand = np.flatnonzero(data.negative_ok[q])
            cand = cand[np.argsort(dist[r, cand], kind="stable")]
            take = rng.choice(len(cand), min(o.neg_pool, len(cand)), replace=False)
            union = np.union1d(cand[take], self.neg_cache.get(int(q), np.zeros(0, dtype=np.int64)))
            negs = union[np.argsort(dist[r, union], kind="stable")][: o.neg_num]
            self.neg_cache[int(q)] = negs
            tuples.append({"q": int(q), "p": int(pools[-1][0]), "negs": negs})
        if gen == 0:
            for t, pool in zip(tuples, pools):
                t["diffs"] = select_difficult_positives(pool, None, o.pos_num)
            return tuples
        reranked = self._rerank_pools(f, chunk, dist, pools)
        for t, pool, rd in zip(tuples, pools, reranked):
            t["diffs"] = select_difficult_positives(pool, rd, o.pos_num)
        return tuples

    def _rerank_pools(self, f, chunk, dist, pools) -> list[np.ndarray]:
        """k-reciprocal re-ranked distances of every anchor's positive pool.

        ``rerank_input=official`` (OpenIBL): the k-reciprocal sets are built over one set of
        every training image, each present once (OpenIBL's all queries + database), and read at
        the chunk's anchors. ``chunk``: the chunk's anchors are the queries and the gallery is
        every training image (the anchor included: a second, zero-distance copy of itself) when
        there are at most ``rerank_gallery``, else the union of each anchor's nearest images and
        its pool."""
        o = self.opts
        if o.rerank_input == "official":
            every = (2.0 - 2.0 * (f @ f.T)).clamp_min(0).double().numpy()
            final = k_reciprocal_rerank_all(every, chunk, k1=o.k1, k2=o.k2, lambda_value=o.rerank_lambda)
            return [final[r, pool] for r, pool in enumerate(pools)]
        n = f.shape[0]
        if n <= o.rerank_gallery:
            gallery = np.arange(n)
        else:
            near = np.argsort(dist, axis=1, kind="stable")[:, : max(2 * o.k1, 50)]
            gallery = np.unique(np.concatenate([near.ravel()] + list(pools)))
        g = torch.as_tensor(gallery)
        q_g = dist[:, gallery]
        fq = f[torch.as_tensor(chunk)]
        q_q = (2.0 - 2.0 * (fq @ fq.T)).clamp_min(0).double().numpy()
        fg = f[g]
        g_g = (2.0 - 2.0 * (fg @ fg.T)).clamp_min(0).double().numpy()
        final = k_reciprocal_rerank(q_g, q_q, g_g, k1=o.k1, k2=o.k2, lambda_value=o.rerank_lambda)
        col = {int(j): c for c, j in enumerate(gallery)}
        return [final[r, [col[int(j)] for j in pool]] for r, pool in enumerate(pools)]
