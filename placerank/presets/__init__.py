"""Named presets (hloc's ``confs``): dataset layouts and training recipes by name.

Each module in this package registers presets with :data:`PRESETS`; ``placerank demo --preset
NAME`` and ``placerank train --preset NAME`` look them up, and ``placerank models`` lists them.
A preset is a plain, typed settings object: commands apply it first, then the user's own flags,
so a preset never hides a setting the user asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from placerank.errors import PlaceRankError
from placerank.registry import Entry, Registry

PRESETS: Registry = Registry("preset", "placerank.presets")


def register_preset(name: str, description: str, kind: str) -> Callable:
    """``kind``: "dataset" (an eval/demo database + queries + positive rule) or "train" (a recipe)."""
    return PRESETS.register(name, description, kind=kind)


def get_preset(name: str, kind: str | None = None) -> Any:
    entry: Entry = PRESETS.get(name)
    if kind is not None and entry.kind != kind:
        names = ", ".join(e.name for e in PRESETS.entries() if e.kind == kind) or "none"
        raise PlaceRankError(f"preset '{name}' is a {entry.kind} preset, not a {kind} preset; {kind} presets: {names}")
    return entry.factory()


def list_presets(kind: str | None = None) -> list[Entry]:
    return [e for e in PRESETS.entries() if kind is None or e.kind == kind]
