"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="effnet-lite0-gem", help="registered model name (see `placerank models`)")
    p.add_argument(
        "--weights", default=None, help="weights file (default: resolved from $PLACERANK_WEIGHTS or ../shared/weights)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=None,
        metavar="PX",
        help="input size: one value (square) or HEIGHT WIDTH (default: the model's)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: min(4, CPUs))")


def image_size_arg(values):
    if values is None:
        return None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise SystemExit("--image-size takes one value or HEIGHT WIDTH")


def add_rerank_args(p: argparse.ArgumentParser, top_k: int = 20) -> None:
    p.add_argument("--rerank", default=None, help="re-ranker name (see `placerank models`)")
    p.add_argument("--top-k", type=int, default=top_k, help=f"candidates re-ranked per query (default {top_k})")
    p.add_argument(
        "--rerank-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="re-ranker option, e.g. mode=dense for fol-region (repeatable; typed, checked before work)",
    )


def rerank_options_arg(name: str | None, values: list[str]) -> dict:
    """``--rerank-option`` strings -> the re-ranker's typed keyword arguments (one-line errors)."""
    from placerank.errors import PlaceRankError
    from placerank.rerank.base import reranker_options

    if name is None:
        if values:
            raise PlaceRankError("--rerank-option needs --rerank NAME")
        return {}
    return reranker_options(name, values)
