"""The model registry: ``placerank.models.create(name, weights=...)``.

Models are plug-ins of the one :class:`~placerank.registry.Registry`: any module in
``placerank/models/`` registers factories with :func:`register_model` and is found without a
hand-kept list. Nothing downloads in a constructor. Factories receive ``weights`` (a path, or None
to resolve the default file) and keyword options such as ``image_size``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from placerank.registry import Entry, Registry

MODELS: Registry = Registry("model", "placerank.models", skip=("registry",))

ModelEntry = Entry


def register_model(name: str, description: str, trainable_here: bool = True) -> Callable:
    return MODELS.register(name, description, trainable_here=trainable_here)


def list_models() -> list[Entry]:
    return MODELS.entries()


def create(name: str, weights: Any = None, **kwargs: Any) -> Any:
    """Build a registered model; ``weights`` is a path (or None for the default file)."""
    return MODELS.create(name, weights=weights, **kwargs)
