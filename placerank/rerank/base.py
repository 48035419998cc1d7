"""Re-ranker contract and registry.

A re-ranker (1) extracts :class:`LocalFeatures` from a batch of preprocessed images and (2)
scores a query's local features against each candidate's. The eval/localize pipelines store the
database side in a :class:`LocalFeatureStore` (float16, memory-mapped) keyed by
``signature()``, read only the candidates, and re-sort them by score with ties broken by the
first-stage rank (stable sort). Re-rankers register by name with :func:`register_reranker`
and appear in ``placerank eval --rerank NAME`` and ``benchmarks/rerank.py`` automatically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from placerank.data.images import Preprocess
from placerank.models.base import LocalFeatures
from placerank.registry import Entry, Registry
from placerank.rerank.topk import rerank_order  # noqa: F401  (re-exported)


class Reranker:
    """Base class. Subclasses set ``name``, ``dim`` and ``preprocess`` and implement
    :meth:`extract` and :meth:`score`."""

    name: str = "reranker"
    dim: int = 0
    preprocess: Preprocess

    def signature(self) -> str:
        """Identity of the stored local features (method, weights, input size)."""
        return f"{self.name}:{self.preprocess.signature()}"

    def to(self, device: torch.device) -> Reranker:
        return self

    def extract(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        """Local features of a preprocessed batch; keypoints in original-image pixels."""
        raise NotImplementedError

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        """One score per candidate (higher = more likely the same place)."""
        raise NotImplementedError


RERANKERS: Registry = Registry("re-ranker", "placerank.rerank", skip=("base",))
RerankerEntry = Entry


def register_reranker(name: str, description: str, needs_model: bool = False) -> Callable:
    """``needs_model``: the factory takes ``model=`` (a VPRModel whose local head it uses)."""
    return RERANKERS.register(name, description, needs_model=needs_model)


def list_rerankers() -> list[Entry]:
    return RERANKERS.entries()


def create_reranker(name: str, model=None, **kwargs) -> Reranker:
    entry = RERANKERS.get(name)
    if entry.needs_model:
        return entry.factory(model=model, **kwargs)
    return entry.factory(**kwargs)
