"""Re-ranker contract and registry.

A re-ranker (1) extracts :class:`LocalFeatures` from a batch of preprocessed images and (2)
scores a query's local features against each candidate's. The eval/localize pipelines store the
database side in a :class:`LocalFeatureStore` (float16, memory-mapped) keyed by
``signature()``, read only the candidates, and re-sort them by score with ties broken by the
first-stage rank (stable sort). Re-rankers register by name with :func:`register_reranker`
and appear in ``placerank eval --rerank NAME`` and ``benchmarks/rerank.py`` automatically.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from placerank.data.images import Preprocess
from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures


class Reranker:
    """Base class. Subclasses set ``name``, ``dim`` and ``preprocess`` and implement
    :meth:`extract` and :meth:`score`."""

    name: str = "reranker"
    dim: int = 0
    preprocess: Preprocess

    def signature(self) -> str:
        """Identity of the stored local features (method, weights, input size)."""
        return f"{self.name}:{self.preprocess.signature()}"

    def to(self, device: torch.device) -> "Reranker":
        return self

    def extract(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        """Local features of a preprocessed batch; keypoints in original-image pixels."""
        raise NotImplementedError

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        """One score per candidate (higher = more likely the same place)."""
        raise NotImplementedError


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Indices that sort candidates by descending score, ties kept in first-stage order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


@dataclass(frozen=True)
class RerankerEntry:
    name: str
    factory: Callable
    description: str
    needs_model: bool = False


_RERANKERS: dict[str, RerankerEntry] = {}
_PLUGIN_MODULES = (
    "placerank.rerank.ransac",
    "placerank.rerank.selavpr_mnn",
    "placerank.rerank.fol_region",
)
_loaded = False


def register_reranker(name: str, description: str, needs_model: bool = False):
    """``needs_model``: the factory takes ``model=`` (a VPRModel whose local head it uses)."""

    def deco(factory: Callable) -> Callable:
        _RERANKERS[name] = RerankerEntry(name, factory, description, needs_model)
        return factory

    return deco


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def list_rerankers() -> list[RerankerEntry]:
    _load_plugins()
    return [_RERANKERS[k] for k in sorted(_RERANKERS)]


def create_reranker(name: str, model=None, **kwargs) -> Reranker:
    _load_plugins()
    if name not in _RERANKERS:
        known = ", ".join(sorted(_RERANKERS)) or "none"
        raise PlaceRankError(f"unknown re-ranker '{name}'; known re-rankers: {known}")
    entry = _RERANKERS[name]
    if entry.needs_model:
        return entry.factory(model=model, **kwargs)
    return entry.factory(**kwargs)
