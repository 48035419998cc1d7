"""Re-ranker contract and registry.

A re-ranker (1) extracts :class:`LocalFeatures` from a batch of preprocessed images and (2)
scores a query's local features against each candidate's. The eval/localize pipelines store the
database side in a :class:`LocalFeatureStore` (float16, memory-mapped) keyed by
``signature()``, read only the candidates, and re-sort them by score with ties broken by the
first-stage rank (stable sort). Re-rankers register by name with :func:`register_reranker`
and appear in ``placerank eval --rerank NAME`` and ``benchmarks/rerank.py`` automatically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from placerank.data.images import Preprocess
from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures
from placerank.options import parse_options, split_key_values
from placerank.registry import Entry, Registry
from placerank.rerank.topk import rerank_order  # noqa: F401  (re-exported)


class Reranker:
    """Base class. Subclasses set ``name``, ``dim`` and ``preprocess`` and implement
    :meth:`score`, and either :meth:`extract` (their own network) or :meth:`local_options` plus a
    ``model`` attribute (the VPR model's own local head: FoL, SelaVPR)."""

    name: str = "reranker"
    dim: int = 0
    preprocess: Preprocess
    model: Any = None  # the VPR model whose local head a re-ranker uses (FoL, SelaVPR)

    def signature(self) -> str:
        """Identity of the stored local features (method, weights, input size)."""
        return f"{self.name}:{self.preprocess.signature()}"

    def to(self, device: torch.device) -> Reranker:
        return self

    def local_options(self) -> dict | None:
        """Options of the model's local head (``VPRModel.encode(..., local_options=...)``) when
        this re-ranker scores the model's own local features; None when it has its own network."""
        return None

    def extract(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        """Local features of a preprocessed batch; keypoints in original-image pixels."""
        options = self.local_options()
        if options is None or self.model is None:
            raise NotImplementedError
        was_training = self.model.training
        self.model.eval()
        try:
            device = next(self.model.parameters()).device
            sizes = [(int(s[0]), int(s[1])) for s in original_sizes]
            with torch.no_grad():
                _, local = self.model.encode(images.to(device), sizes, local_options=options)
        finally:
            self.model.train(was_training)
        assert local is not None
        return local

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        """One score per candidate (higher = more likely the same place)."""
        raise NotImplementedError


def shares_model_head(model, reranker: Reranker | None) -> bool:
    """True when ``reranker`` scores ``model``'s own local features with ``model``'s preprocessing,
    so one ``model.encode`` pass per image gives the global descriptor and the local features."""
    return (
        reranker is not None
        and reranker.model is model
        and reranker.local_options() is not None
        and getattr(model, "preprocess", None) == reranker.preprocess
    )


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric re-ranker option: ``low`` <= value <= ``high`` (either
    may be None: unbounded; ``open_low``: value > ``low``); ``whole``: a whole number."""

    low: float | None = None
    high: float | None = None
    whole: bool = False
    open_low: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low = None if self.low is None else f"{self.low:g}"
        high = None if self.high is None else f"{self.high:g}"
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.open_low else '['}{low}, {high}]"
        if low is not None:
            return f"{kind} {'>' if self.open_low else '>='} {low}"
        return f"{kind} <= {high}"


def check_option_ranges(name: str, values: Mapping[str, Any], bounds: Mapping[str, Bound]) -> None:
    """One :class:`PlaceRankError` line for the first option of re-ranker ``name`` outside its
    :class:`Bound` (None: the option's default, always allowed; booleans are not numbers here),
    e.g. ``fol-region option chunk: must be a whole number >= 1, got 0``."""
    for key, bound in bounds.items():
        value = values.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            continue
        if not bound.holds(float(value)):
            raise PlaceRankError(f"{name} option {key}: must be {bound.describe()}, got {value}")


RERANKERS: Registry = Registry("re-ranker", "placerank.rerank", skip=("base",))
RerankerEntry = Entry


def register_reranker(
    name: str, description: str, needs_model: bool = False, bounds: Mapping[str, Bound] | None = None
) -> Callable:
    """``needs_model``: the factory takes ``model=`` (a VPRModel whose local head it uses).
    ``bounds``: the allowed range of its numeric options, checked when ``--rerank-option`` values
    are parsed (:func:`reranker_options`, before any work) and again by the factory
    (:func:`check_option_ranges`)."""
    return RERANKERS.register(name, description, needs_model=needs_model, bounds=dict(bounds or {}))


def list_rerankers() -> list[Entry]:
    return RERANKERS.entries()


def create_reranker(name: str, model=None, **kwargs) -> Reranker:
    entry = RERANKERS.get(name)
    if entry.needs_model:
        return entry.factory(model=model, **kwargs)
    return entry.factory(**kwargs)


def reranker_options(name: str, values: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``--rerank-option KEY=VALUE`` strings (or a dict) -> the keyword arguments of re-ranker
    ``name``, each converted to the type of its option (:mod:`placerank.options`); an unknown key
    or a bad value (wrong type, NaN / inf, outside the option's :class:`Bound`) is one
    :class:`PlaceRankError` line. Only the keys given are returned, so the
    re-ranker's own defaults apply to the rest (``weights``, where a factory takes it, is the
    path of its feature network's weights)."""
    values = (
        split_key_values(values, "--rerank-option")
        if values is not None and not isinstance(values, Mapping)
        else dict(values or {})
    )
    entry = RERANKERS.get(name)
    parsed = parse_options(entry.options(), values, what=f"{name} option")
    options = {k: getattr(parsed, k) for k in values}
    check_option_ranges(name, options, entry.traits.get("bounds", {}))
    return options
