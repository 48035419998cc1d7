"""``--rerank selavpr-mnn``: SelaVPR's re-ranking (spec §5.2).

Each top-K candidate is scored by the **number of mutual nearest neighbours** between the
query's and the candidate's dense local features (the ``LocalAdapt`` grid of a ``selavpr-*``
model: 61x61 for ViTs at 224 px, 45x77 for EfficientNet at 360x640); candidates are re-sorted
by that count, ties kept in first-stage order. No ratio test, threshold or geometry.

Memory: the query-vs-candidate similarity tensor is built for a chunk of candidates at a time,
with the chunk size derived from ``max_chunk_mb`` (one 3,721 x 3,721 fp32 matrix is 55 MB, a
whole top-100 would be 5.5 GB), so any K runs in bounded memory on CPU or GPU. Database
features live in the float16 :class:`~placerank.descriptors.local_store.LocalFeatureStore` and are read
only for the candidates; they are upcast to float32 before the matrix product.

Options: ``max_chunk_mb`` (256), ``min_matches`` (2: a single mutual match scores 0, as in the
official code; 0 to count it), ``threshold`` and ``fusion`` (below).

Extension for CNN backbones (not in the official code, which counts every mutual pair and never
fuses the global ranking): on held-out GardensPoint (frames 100-139, db day_left or day_right,
queries night_right, top-10; docs/selavpr.md, ``benchmarks/heldout_local_heads.py``) the plain count
*lowers* R@1 of ``selavpr-effnet-lite0`` below its own global ranking (untrained head 0.65 ->
0.425, trained 0.70 -> 0.625): the Lite0 map is coarse (7 x 13 patches at 224 x 400, up-sampled to
25 x 49 near-duplicate cells), so most mutual pairs are arbitrary argmaxes among look-alike cells
of sky, road and foliage, and their number says more about an image's texture than about the
place. Two changes fix it and are the CNN's defaults (the ``selavpr-vit*`` models keep the
official rule):

- ``threshold`` (CNN default 0.7, FoL's value): count only mutual pairs with cosine above it;
- ``fusion="rank"``: score = z(count) + z(−first-stage rank), both standardised over the query's
  top-K (a count tied across candidates leaves the first-stage order). Candidates reach
  :meth:`score` in first-stage order (:func:`placerank.rerank.topk.rerank_topk`), so the rank is
  their position. ``fusion="none"`` is the official count; ``"auto"`` (default) picks by backbone.
  ``threshold`` None picks by backbone too; -1 counts every mutual pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures
from placerank.rerank.base import Bound, Reranker, check_option_ranges, register_reranker
from placerank.rerank.mutual_nn import mnn_counts, mutual_pairs_array


class SelaVPRMNNReranker(Reranker):
    name = "selavpr-mnn"

    def __init__(
        self,
        model,
        max_chunk_mb: float = 256.0,
        min_matches: int = 2,
        device: str | torch.device = "cpu",
        threshold: float | None = None,
        fusion: str = "auto",
    ):
        from placerank.models.selavpr import SelaVPRModel

        if not isinstance(model, SelaVPRModel):
            got = getattr(model, "name", type(model).__name__) if model is not None else "no model"
            raise PlaceRankError(f"re-ranker 'selavpr-mnn' needs a SelaVPR model (--model selavpr-...), got '{got}'")
        if max_chunk_mb <= 0:
            raise PlaceRankError(f"max_chunk_mb must be > 0, got {max_chunk_mb}")
        self.model = model
        self.dim = model.local_dim
        self.preprocess = model.preprocess
        self.max_chunk_mb = float(max_chunk_mb)
        self.min_matches = int(min_matches)
        official = str(getattr(model, "name", "")).startswith("selavpr-vit")
        self.threshold = (None if official else CNN_THRESHOLD) if threshold is None else float(threshold)
        self.fusion = ("none" if official else "rank") if fusion == "auto" else str(fusion)
        if self.fusion not in FUSIONS:
            raise PlaceRankError(f"selavpr-mnn option fusion must be one of auto, {', '.join(FUSIONS)}, got '{fusion}'")
        self.device = torch.device("cpu")
        self.to(device)

    def signature(self) -> str:
        """Local features depend on the model's weights and input size, so both are in the key."""
        return f"{self.name}:{self.model.name}:{self.model.weights_id}:{self.preprocess.signature()}"

    def to(self, device) -> SelaVPRMNNReranker:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def local_options(self) -> dict:
        """The dense ``LocalAdapt`` grid has no options: one ``model.encode`` pass gives both."""
        return {}

    def chunk_size(self, n_query: int, n_cand: int) -> int:
        """Candidates per batched matrix product so that the (chunk, n_c, n_q) float32
        similarities (plus the masked copy) stay within ``max_chunk_mb``."""
        per_candidate = max(1, n_query) * max(1, n_cand) * 4 * 2
        return max(1, int(self.max_chunk_mb * 2**20 // per_candidate))

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        if not candidates:
            return np.zeros(0, dtype=np.int64)
        n_c = max(len(c) for c in candidates)
        chunk = self.chunk_size(len(query), n_c)
        counts = mnn_counts(
            query.descriptors,
            [c.descriptors for c in candidates],
            threshold=self.threshold,
            chunk=chunk,
            device=self.device,
            min_matches=self.min_matches,
        )
        return counts if self.fusion == "none" else rank_fusion(counts)

    def matches(self, query: LocalFeatures, candidate: LocalFeatures) -> np.ndarray:
        """(P, 2) int64 (query index, candidate index) of the mutual nearest neighbours — the
        pairs :meth:`score` counts (for match pictures)."""
        with torch.no_grad():
            return mutual_pairs_array(query.descriptors, candidate.descriptors, device=self.device)


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def rank_fusion(counts: np.ndarray) -> np.ndarray:
    """z(count) + z(−position) over one query's candidates given in first-stage order: equal
    weight to the local evidence and the global ranking, no scale to tune. Hand example: counts
    (0, 9, 0) -> z = (−0.707, 1.414, −0.707), ranks (0, −1, −2) -> z = (1.225, 0, −1.225);
    scores (0.518, 1.414, −1.932): the second candidate moves first."""
    c = np.asarray(counts, dtype=np.float64)
    return _z(c) + _z(-np.arange(len(c), dtype=np.float64))


CNN_THRESHOLD = 0.7
FUSIONS = ("none", "rank")
BOUNDS = {
    "max_chunk_mb": Bound(0.0, open_low=True),
    "min_matches": Bound(0, whole=True),
    "threshold": Bound(-1.0, 1.0),
}


@register_reranker(
    "selavpr-mnn",
    "SelaVPR: count of mutual nearest neighbours between dense local features (needs a selavpr-* model; "
    "CNN default: cos > 0.7 and fused with the global rank)",
    needs_model=True,
    bounds=BOUNDS,
)
def _selavpr_mnn(
    model=None,
    max_chunk_mb: float = 256.0,
    min_matches: int = 2,
    device="cpu",
    threshold: float | None = None,
    fusion: str = "auto",
) -> SelaVPRMNNReranker:
    values = {"max_chunk_mb": max_chunk_mb, "min_matches": min_matches}
    if threshold is not None:
        values["threshold"] = threshold
    check_option_ranges("selavpr-mnn", values, BOUNDS)
    return SelaVPRMNNReranker(
        model, max_chunk_mb=max_chunk_mb, min_matches=min_matches, device=device, threshold=threshold, fusion=fusion
    )
