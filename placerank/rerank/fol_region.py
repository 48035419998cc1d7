"""``--rerank fol-region``: FoL's re-ranking (spec ``fol.md`` §5) on compact region features.

For each of the top-K candidates, the score is the number of mutual nearest neighbours with
cosine > 0.7 between the query's and the candidate's region features; candidates are re-sorted
by that count, ties by first-stage rank (global similarity is not fused, as in the official
code). The region is the top-N (225) patches of the aggregator's keep-mass map Mᵃ.

The region's features follow the model's ``local_mode`` (the ``mode`` option overrides it):

- ``dense`` (default of ``fol-vit*``, so official weights re-rank as the paper does): every
  up-conv cell of the top-225 patches, the official set (~3,000-3,600 features, ~0.8-0.9 MB per
  image in float16 with positions; the official code zero-pads to 3600 x 128 float32 = 1.84 MB
  without positions — zero rows never pass the 0.7 threshold nor take a mutual match above it,
  so the counts are the same, tested);
- ``pool3`` (default of ``fol-effnet-lite0``): one 128-d feature per selected patch, the mean of
  the normalised up-conv cells in the 3 x 3 window at the patch centre: 225 x (256 B desc + 8 B
  position + 4 B score) = 60.3 KB per image (measured in docs/fol.md: R@1 0.975 vs dense's
  1.000 at 15x less storage, ~235x faster scoring);
- ``center``: the single centre cell per patch, same size as pool3.

Every surviving mutual pair counts (``min_matches=0``), as officially. ``single_pair_zero``: a
candidate with exactly one mutual pair *before* the 0.7 threshold scores 0, the official
``match_batch_tensor`` rule; default on for ``fol-vit*`` (official backbones), off for the CNN
(docs/fol.md: measured, no re-ranked list changes on the CPU recipe). Features are
read (memory-mapped) from the float16 :class:`LocalFeatureStore` only for the candidates.
Scoring is one batched matrix product per chunk of
candidates: on GPU :func:`placerank.rerank.mutual_nn.mnn_counts` (``bmm``), on CPU
:func:`~placerank.rerank.mutual_nn.mnn_counts_cpu` (one GEMM + numpy argmaxes, same counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures
from placerank.rerank.base import Bound, Reranker, check_option_ranges, register_reranker
from placerank.rerank.mutual_nn import mnn_counts, mnn_counts_cpu, mutual_pairs_array


class FoLRegionReranker(Reranker):
    name = "fol-region"

    def __init__(
        self,
        model,
        threshold: float = 0.7,
        mode: str | None = None,
        num_regions: int | None = None,
        chunk: int = 128,
        min_matches: int = 0,
        single_pair_zero: bool | None = None,
    ):
        from placerank.models.fol import LOCAL_MODES, FoLModel

        if not isinstance(model, FoLModel):
            got = getattr(model, "name", None) or type(model).__name__
            raise PlaceRankError(
                f"--rerank fol-region needs a FoL model (fol-effnet-lite0, fol-vitb14, fol-vitl14), got '{got}'"
            )
        self.model = model
        self.mode = mode or model.cfg.local_mode
        if self.mode not in LOCAL_MODES:
            raise PlaceRankError(f"unknown fol-region mode '{self.mode}' (known: {', '.join(LOCAL_MODES)})")
        self.num_regions = int(num_regions or model.cfg.num_regions)
        self.threshold = float(threshold)
        self.chunk = int(chunk)
        self.min_matches = int(min_matches)
        official = str(getattr(model, "name", "")).startswith("fol-vit")
        self.single_pair_zero = official if single_pair_zero is None else bool(single_pair_zero)
        self.dim = model.local_dim
        self.preprocess = model.preprocess
        self.device = next(model.parameters()).device

    def signature(self) -> str:
        return (
            f"{self.name}:{self.model.name}:{self.model.weights_id}:{self.mode}:n{self.num_regions}:"
            f"{self.preprocess.signature()}"
        )

    def to(self, device) -> FoLRegionReranker:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def local_options(self) -> dict:
        """The FoL head's options: one ``model.encode`` pass gives global + these region features."""
        return {"mode": self.mode, "num_regions": self.num_regions}

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        descs = [c.descriptors for c in candidates]
        if self.device.type == "cpu":
            counts = mnn_counts_cpu(
                query.descriptors,
                descs,
                self.threshold,
                self.min_matches,
                single_pair_zero=self.single_pair_zero,
            )
        else:  # one batched bmm per chunk on the accelerator, chunk bounded to ~256 MB of similarities
            n_max = max([len(d) for d in descs] + [1])
            chunk = max(1, min(self.chunk, int(256 * 2**20 // (8 * n_max * max(1, len(query))))))
            counts = mnn_counts(
                query.descriptors,
                descs,
                threshold=self.threshold,
                chunk=chunk,
                device=self.device,
                min_matches=self.min_matches,
                single_pair_zero=self.single_pair_zero,
            )
        return counts.astype(np.float64)

    def matches(self, query: LocalFeatures, candidate: LocalFeatures) -> np.ndarray:
        """(P, 2) int array of (query index, candidate index) mutual NNs with cosine > threshold."""
        return mutual_pairs_array(query.descriptors, candidate.descriptors, self.threshold)


# the allowed range of the numeric options (threshold: a cosine similarity)
BOUNDS = {
    "threshold": Bound(-1.0, 1.0),
    "num_regions": Bound(1, whole=True),
    "chunk": Bound(1, whole=True),
    "min_matches": Bound(0, whole=True),
}


@register_reranker(
    "fol-region",
    "FoL: count of mutual NNs (cos > 0.7) between top-225 region features (official dense cells for "
    "fol-vit*, 60 KB/image pool3 for the CNN); needs a fol-* model",
    needs_model=True,
    bounds=BOUNDS,
)
def _fol_region(
    model=None,
    threshold: float = 0.7,
    mode: str | None = None,
    num_regions: int | None = None,
    chunk: int = 128,
    min_matches: int = 0,
    single_pair_zero: bool | None = None,
) -> FoLRegionReranker:
    options = dict(threshold=threshold, num_regions=num_regions, chunk=chunk, min_matches=min_matches)
    check_option_ranges("fol-region", options, BOUNDS)
    return FoLRegionReranker(
        model,
        threshold=threshold,
        mode=mode,
        num_regions=num_regions,
        chunk=chunk,
        min_matches=min_matches,
        single_pair_zero=single_pair_zero,
    )
