"""Argument helpers shared by sub-commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from placerank.descriptors.memory import DEFAULT_MAX_MEMORY_GB
from placerank.descriptors.runtime import default_runtime
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
    p.add_argument(
        "--max-memory-gb",
        type=positive_float,
        default=DEFAULT_MAX_MEMORY_GB,
        metavar="GB",
        help=f"extraction cuts its batch size so this process's peak RSS stays under GB (default {DEFAULT_MAX_MEMORY_GB:g})",
    )
    if not for_database:
        p.add_argument("--batch-size", type=positive_int, default=16)
        p.add_argument(
            "--workers", type=non_negative_int, default=None, help="DataLoader workers (default: min(4, CPUs))"
        )


def add_precision_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--precision``: the model's forward in float32, or under bf16 / fp16 autocast; ``auto``
    takes what the model's recall check chose on this device (docs/inference.md)."""
    p.add_argument(
        "--precision",
        default=default,
        choices=["auto", "fp32", "bf16", "fp16"],
        help=f"inference precision (default {default}): auto (the fastest one whose measured GardensPoint R@1 is"
        " within 0.5 points of fp32 for this model on this device, else fp32), fp32, bf16 (CPU or CUDA) or fp16"
        " (CUDA only) autocast; descriptors stay float32, cached per precision",
    )


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """``--compile auto|on|off`` (and ``--no-compile``): torch.compile of the backbone; and
    ``--runtime auto|torch|openvino``: what runs the model."""
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the backbone: auto (default: only when enough images are to be extracted to repay the"
        " compile time), on, off",
    )
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument(
        "--runtime",
        default=default_runtime(),
        choices=["auto", "torch", "openvino"],
        help="what runs the model: auto (default, or $PLACERANK_RUNTIME: OpenVINO on a CPU where it is installed"
        " once the model is exported or the job is large enough to repay the export, else torch), torch, or"
        " openvino (the exported ONNX file on OpenVINO, fp32 / bf16, CPU only, the fastest measured CPU path;"
        " exported once per model, weights and input size into the cache); docs/inference.md",
    )


def check_precision_arg(precision: str, device) -> None:
    """A precision the device cannot run is one line before the model is loaded (``auto`` is fine)."""
    from placerank.descriptors.fast import check_precision

    if precision != "auto":
        check_precision(precision, device)


def inference_setup(args, model, device, images: int = 0) -> str:
    """Apply ``--compile``, ``--runtime`` (``auto``: decided for ``images`` to extract) and
    channels_last to a loaded ``model`` (on ``device``, eval mode) and return the concrete
    ``--precision`` (``auto`` resolved from the model's recall check for that runtime)."""
    from placerank.descriptors.fast import prepare_inference, resolve_precision
    from placerank.descriptors.runtime import choose_runtime

    runtime = choose_runtime(getattr(args, "runtime", "auto"), model, device, images)
    prepare_inference(model, device, getattr(args, "compile", "off"), runtime)
    return resolve_precision(getattr(args, "precision", "fp32"), model, device)


def add_nproc_arg(p: argparse.ArgumentParser) -> None:
    """``--nproc N``: extract with N local processes (torch's elastic launcher), one shard each."""
    p.add_argument(
        "--nproc",
        type=int_arg,
        default=1,
        metavar="N",
        help="extract with N local processes, 1 to 64 (default 1; under torchrun leave it out)",
    )


def int_arg(text: str) -> int:
    """A whole number (its range is checked with a one-line error by the command)."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None


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


def add_index_args(p: argparse.ArgumentParser, for_database: bool = False) -> None:
    """``--index SPEC`` (a FAISS index-factory string, docs/index.md) and repeatable
    ``--index-option KEY=VALUE`` (search parameters: nprobe, efSearch, ...)."""
    default_help = "an existing database keeps its own; new: flat" if for_database else "default flat"
    p.add_argument(
        "--index",
        default=None if for_database else "flat",
        metavar="SPEC",
        help=f"index kind: flat, flat-fp16 or a FAISS factory string such as IVF1024,Flat, IVF4096,PQ64, "
        f"HNSW32 ({default_help}; see docs/index.md)",
    )
    p.add_argument(
        "--index-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="index search option, e.g. nprobe=32 (IVF) or efSearch=64 (HNSW); repeatable",
    )


def index_options_arg(values: list[str]) -> dict[str, str]:
    """``--index-option`` strings -> {"nprobe": "32"} (checked against the index when it is built)."""
    from placerank.options import split_key_values

    return split_key_values(values, "--index-option")
