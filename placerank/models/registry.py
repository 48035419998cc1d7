"""One registry of named models: ``placerank.models.create(name, weights=...)``.

Method packages register themselves with :func:`register_model`; nothing downloads in a
constructor. Factories receive ``weights`` (a path, or None to resolve the default file) and
keyword options such as ``image_size``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from placerank.errors import PlaceRankError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable
    description: str
    trainable_here: bool = True


_MODELS: dict[str, ModelEntry] = {}

# Modules that register models when imported. Method packages add themselves here.
_PLUGIN_MODULES = (
    "placerank.models.zoo",
    "placerank.models.selavpr",
    "placerank.models.fol",
    "placerank.models.sfrs",
)
_loaded = False


def register_model(name: str, description: str, trainable_here: bool = True):
    def deco(factory: Callable) -> Callable:
        _MODELS[name] = ModelEntry(name, factory, description, trainable_here)
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
            if e.name != mod:  # a real missing dependency inside an existing plug-in
                raise


def list_models() -> list[ModelEntry]:
    _load_plugins()
    return [_MODELS[k] for k in sorted(_MODELS)]


def create(name: str, weights=None, **kwargs):
    """Build a registered model; ``weights`` is a path (or None for the default file)."""
    _load_plugins()
    if name not in _MODELS:
        raise PlaceRankError(f"unknown model '{name}'; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name].factory(weights=weights, **kwargs)
