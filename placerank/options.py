"""One typed options parser for ``--option KEY=VALUE`` / ``--rerank-option KEY=VALUE``.

Every plug-in's options are a dataclass: either declared by the plug-in, or derived from its
factory's keyword parameters (:func:`options_dataclass`). Values given on the command line are
strings; :func:`parse_options` converts each to the field's type, so an unknown key or a value of
the wrong type is one :class:`~placerank.errors.PlaceRankError` line before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from placerank.errors import PlaceRankError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def split_key_values(items: Iterable[str], flag: str = "--option") -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a missing ``=`` is a one-line error."""
    out: dict[str, str] = {}
    for text in items:
        if "=" not in text:
            raise PlaceRankError(f"{flag} expects KEY=VALUE, got '{text}'")
        key, value = text.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise PlaceRankError(f"{flag} expects KEY=VALUE, got '{text}'")
        out[key] = value
    return out


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (often a string) to the annotation ``tp``; raise one line on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except PlaceRankError as e:
                errors.append(str(e))
        raise PlaceRankError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == str(value):
                return choice
        raise PlaceRankError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = value if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p != ""]
        item_types = [a for a in args if a is not Ellipsis] or [str]
        conv = [_convert(p, item_types[min(i, len(item_types) - 1)], where) for i, p in enumerate(parts)]
        return tuple(conv) if origin is tuple else conv
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise PlaceRankError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise PlaceRankError(f"{where}: expected a number, got {value!r}")
        try:
            number = tp(value) if not (tp is int and isinstance(value, str)) else int(value, 10)
        except (TypeError, ValueError):
            kind = "a whole number" if tp is int else "a number"
            raise PlaceRankError(f"{where}: expected {kind}, got {value!r}") from None
        if tp is float and not math.isfinite(number):
            raise PlaceRankError(f"{where}: expected a number, got {value!r}")
        return number
    if tp is str:
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to the defaults' types
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type if not isinstance(f.type, str) else Any)
        if tp is Any and f.default is not dataclasses.MISSING and f.default is not None:
            tp = type(f.default)
        out[f.name] = tp
    return out


def parse_options(
    cls: type, values: Mapping[str, Any] | Iterable[str] | None, what: str = "option", base: Any = None
) -> Any:
    """Build ``cls`` (a dataclass) from ``KEY=VALUE`` strings or a mapping; ``base`` is an
    existing instance whose fields are the defaults. Unknown keys and bad values raise one line."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        values = split_key_values(values)
    fields = _field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise PlaceRankError(f"unknown {what} '{unknown[0]}'; known: {known}")
    kwargs = {k: _convert(v, fields[k], f"{what} {k}") for k, v in values.items()}
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PlaceRankError(f"{what}: {e}") from None


@cache
def options_dataclass(factory: Callable[..., Any], name: str) -> type:
    """The keyword parameters of ``factory`` that have defaults, as a dataclass (typed by their
    annotations, else by their defaults). Parameters the pipeline passes itself (``model``,
    ``device``) are not user options; ``weights`` is one (a re-ranker's feature weights file)."""
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:
        hints = {}
    fields = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if p.name in ("model", "device"):
            continue
        tp = hints.get(p.name, type(p.default) if p.default is not None else Any)
        fields.append((p.name, tp, dataclasses.field(default=p.default)))
    cls_name = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "Options"
    return dataclasses.make_dataclass(cls_name, fields, frozen=True)


def options_to_kwargs(options: Any) -> dict[str, Any]:
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
