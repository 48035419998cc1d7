"""``--rerank fol-region``: FoL's re-ranking (spec ``fol.md`` §5) on compact region features.

For each of the top-K candidates, the score is the number of mutual nearest neighbours with
cosine > 0.7 between the query's and the candidate's region features; candidates are re-sorted
by that count, ties by first-stage rank (global similarity is not fused, as in the official
code). The region is the top-N (225) patches of the aggregator's keep-mass map Mᵃ.

Storage (the difference from the official code): the official code keeps every up-conv cell
inside the region, zero-padded to 3600 x 128 float32 = 1.84 MB per image, with no positions.
Here each image stores a variable-length set with pixel positions in the float16
:class:`LocalFeatureStore` — by default one 128-d feature per selected patch (the up-conv
cell at the patch centre): 225 x (256 B desc + 8 B position + 4 B score) = 60.3 KB per image,
read (memory-mapped) only for the candidates. ``mode="dense"`` stores the official cell set for
comparison (~0.9 MB per image in float16). Scoring is one batched ``bmm`` per chunk of
candidates (:func:`placerank.rerank.mnn.mnn_counts`), on CPU or GPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures
from placerank.rerank.base import Reranker, register_reranker
from placerank.rerank.mnn import mnn_counts


class FoLRegionReranker(Reranker):
    name = "fol-region"

    def __init__(self, model, threshold: float = 0.7, mode: str | None = None, num_regions: int | None = None,
                 chunk: int = 128, min_matches: int = 0):
        from placerank.models.fol import LOCAL_MODES, FoLModel

        if not isinstance(model, FoLModel):
            got = getattr(model, "name", None) or type(model).__name__
            raise PlaceRankError(
                f"--rerank fol-region needs a FoL model (fol-effnet-lite0, fol-vitb14, fol-vitl14), got '{got}'")
        self.model = model
        self.mode = mode or model.cfg.local_mode
        if self.mode not in LOCAL_MODES:
            raise PlaceRankError(f"unknown fol-region mode '{self.mode}' (known: {', '.join(LOCAL_MODES)})")
        self.num_regions = int(num_regions or model.cfg.num_regions)
        self.threshold = float(threshold)
        self.chunk = int(chunk)
        self.min_matches = int(min_matches)
        self.dim = model.local_dim
        self.preprocess = model.preprocess
        self.device = next(model.parameters()).device

    def signature(self) -> str:
        return (f"{self.name}:{self.model.name}:{self.model.weights_id}:{self.mode}:n{self.num_regions}:"
                f"{self.preprocess.signature()}")

    def to(self, device) -> "FoLRegionReranker":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.no_grad()
    def extract(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        was_training = self.model.training
        self.model.eval()
        try:
            sizes = [tuple(int(v) for v in s) for s in original_sizes]
            return self.model.local_features(images.to(self.device), sizes, mode=self.mode,
                                             num_regions=self.num_regions)
        finally:
            self.model.train(was_training)

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        counts = mnn_counts(query.descriptors, [c.descriptors for c in candidates], threshold=self.threshold,
                            chunk=self.chunk, device=self.device, min_matches=self.min_matches)
        return counts.astype(np.float64)

    def matches(self, query: LocalFeatures, candidate: LocalFeatures) -> np.ndarray:
        """(P, 2) int array of (query index, candidate index) mutual NNs with cosine > threshold."""
        from placerank.train.losses.mnn import mutual_nn_pairs

        if len(query) == 0 or len(candidate) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        q = torch.as_tensor(np.asarray(query.descriptors, dtype=np.float32))
        c = torch.as_tensor(np.asarray(candidate.descriptors, dtype=np.float32))
        i, j = mutual_nn_pairs(q @ c.t(), self.threshold)
        return np.stack([i.numpy(), j.numpy()], axis=1).astype(np.int64)


@register_reranker("fol-region",
                   "FoL: count of mutual NNs (cos > 0.7) between top-225 region features (60 KB/image); "
                   "needs a fol-* model", needs_model=True)
def _fol_region(model=None, **kwargs) -> FoLRegionReranker:
    return FoLRegionReranker(model, **kwargs)
