"""One registry for every kind of plug-in: models, re-rankers, training methods, local features,
presets.

A plug-in is a module inside the registry's package that registers one or more named factories
with :meth:`Registry.register`. Nothing keeps a hand-written list of modules: on first use the
registry imports every module of its package (as hloc's ``dynamic_load`` finds a model by module
name), so adding a model, a re-ranker or a preset is adding one file. Options that a factory takes
as keyword arguments become a typed dataclass (:mod:`placerank.options`), so ``--option`` values
are checked before anything runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from placerank.errors import PlaceRankError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered plug-in: its name, the factory that builds it, a one-line description and
    free-form traits (``trainable_here``, ``needs_model``, ...)."""

    name: str
    factory: Callable[..., Any]
    description: str = ""
    module: str = ""
    traits: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, item: str) -> Any:  # traits read as attributes: entry.needs_model
        traits = self.__dict__.get("traits", {})
        if item in traits:
            return traits[item]
        raise AttributeError(item)

    def options(self) -> type:
        """The dataclass of this plug-in's keyword options (see :mod:`placerank.options`)."""
        from placerank.options import options_dataclass

        return options_dataclass(self.factory, self.name)


class Registry(Generic[F]):
    """Named factories of one kind, found by scanning ``package`` for plug-in modules.

    ``skip`` names modules of the package that hold shared code rather than plug-ins; they are
    imported anyway when a plug-in imports them, which is harmless.
    """

    def __init__(self, kind: str, package: str, skip: tuple[str, ...] = ()):
        self.kind = kind
        self.package = package
        self.skip = set(skip)
        self._entries: dict[str, Entry] = {}
        self._scanned = False

    def register(self, name: str, description: str = "", **traits: Any) -> Callable[[F], F]:
        """Decorator: ``@MODELS.register("effnet-lite0-gem", "...", trainable_here=True)``."""

        def deco(factory: F) -> F:
            if name in self._entries and self._entries[name].factory is not factory:
                raise PlaceRankError(
                    f"{self.kind} '{name}' is registered twice ({self._entries[name].module} and {factory.__module__})"
                )
            self._entries[name] = Entry(name, factory, description, factory.__module__, dict(traits))
            return factory

        return deco

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name.startswith("_") or info.name in self.skip:
                continue
            name = f"{self.package}.{info.name}"
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as e:
                # An optional dependency missing inside a plug-in hides that plug-in only.
                if e.name is None or e.name.split(".")[0] in ("placerank",):
                    raise

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        self._scan()
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        self._scan()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self._scan()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PlaceRankError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}")
        return self._entries[name]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name).factory(**kwargs)
