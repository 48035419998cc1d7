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


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, value) with ints, floats and booleans converted."""
    if "=" not in text:
        raise SystemExit(f"expected key=value, got '{text}'")
    k, v = text.split("=", 1)
    for cast in (int, float):
        try:
            return k, cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return k, v.lower() == "true"
    return k, v
