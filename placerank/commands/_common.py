"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from placerank.errors import PlaceRankError

DEFAULT_MODEL = "effnet-lite0-gem"


def _number(kind: type, low: float, strict: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) > ``low`` (``strict``) or >= ``low``.
    A bad value is one line when parsing: ``argument --radius: must be a number > 0, got '-5'``."""
    rule = f"{'>' if strict else '>='} {low:g}"
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = int(text, 10) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {rule}, got '{text}'") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {what} {rule}, got '{text}'")
        return value

    parse.__name__ = f"{what} {rule}"
    return parse


positive_float = _number(float, 0, strict=True)  # --radius, --max-minutes, --lr
non_negative_float = _number(float, 0, strict=False)  # --wait
positive_int = _number(int, 1, strict=False)  # --top-k, --batch-size, --epochs, --image-size
non_negative_int = _number(int, 0, strict=False)  # --frame-tolerance, --workers, --examples


def add_model_args(
    p: argparse.ArgumentParser,
    for_database: bool = False,
) -> None:
    """``--model --weights --image-size --device`` (+ ``--batch-size --workers``). With
    ``for_database`` (index / localize) the model defaults to what the database was built with."""
    if for_database:
        p.add_argument(
            "--model", default=None, help=f"model name (new database: {DEFAULT_MODEL}; existing: must match)"
        )
        p.add_argument("--weights", default=None, help="weights file (existing database: the one it was built with)")
        size_help = "model input: one value (square) or HEIGHT WIDTH (new database only)"
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help="registered model name (see `placerank models`)")
        p.add_argument(
            "--weights", default=None, help="weights file (default: from $PLACERANK_WEIGHTS or ../shared/weights)"
        )
        size_help = "input size: one value (square) or HEIGHT WIDTH (default: the model's)"
    p.add_argument("--image-size", type=positive_int, nargs="+", default=None, metavar="PX", help=size_help)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    if not for_database:
        p.add_argument("--batch-size", type=positive_int, default=16)
        p.add_argument(
            "--workers", type=non_negative_int, default=None, help="DataLoader workers (default: min(4, CPUs))"
        )


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """``--precision``: the model's forward in float32, or under bf16 / fp16 autocast."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="inference precision: fp32 (default), bf16 (CPU or CUDA) or fp16 (CUDA only) autocast;"
        " descriptors stay float32, cached per precision",
    )


def image_size_arg(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise PlaceRankError("--image-size takes one positive value or HEIGHT WIDTH")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def add_rerank_args(p: argparse.ArgumentParser, top_k: int = 20) -> None:
    p.add_argument("--rerank", default=None, help="re-ranker name (see `placerank models`)")
    p.add_argument(
        "--top-k", type=positive_int, default=top_k, help=f"candidates re-ranked per query (default {top_k})"
    )
    p.add_argument(
        "--rerank-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="re-ranker option, e.g. mode=dense for fol-region (repeatable; typed, checked before work)",
    )


def rerank_options_arg(name: str | None, values: list[str]) -> dict:
    """``--rerank-option`` strings -> the re-ranker's typed keyword arguments (one-line errors)."""
    from placerank.rerank.base import reranker_options

    if name is None:
        if values:
            raise PlaceRankError("--rerank-option needs --rerank NAME")
        return {}
    return reranker_options(name, values)
