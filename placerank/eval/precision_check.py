"""The recall check behind ``--precision auto``: is reduced precision fast *and* as accurate here?

For one model on this device class, GardensPoint Walking ``day_right`` (database) -> ``night_right``
(queries), positives ``|i-j| <= 2`` (the demo's benchmark, real shared data) is extracted once per
candidate precision — fp32, then bf16 where the CPU has native bf16 (AMX / AVX512-BF16) or on
CUDA, and fp16 on CUDA — at the model's input size with the fast path (channels_last, eager),
then each reduced precision once more with the backbone compiled (``compiled`` runs: inductor's
fused kernels round differently, and ``--compile auto`` compiles a reduced precision only where
these hold recall). Each run records R@1, milliseconds per image
(decode included, after one untimed warm-up batch) and how far its descriptors are from fp32's
(min cosine, max abs difference). :func:`placerank.descriptors.fast.choose_precision` then takes
the fastest precision within 0.5 R@1 points of fp32. Records go to the cache root
(``precision-checks/``), where ``--precision auto`` finds them before the shipped ones.
"""

from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from placerank.data.layouts import LayoutOptions, open_dataset
from placerank.data.places import find_shared_data
from placerank.descriptors.extract import extract_global
from placerank.descriptors.fast import (
    RECALL_TOLERANCE,
    check_record_path,
    choose_precision,
    device_class,
    prepare_inference,
)
from placerank.eval.recall import recall_at_n
from placerank.index.flat import FlatIndex
from placerank.utils import write_json_atomic

CHECK_DATASET = ("gardenspoint_walking/day_right", "gardenspoint_walking/night_right", 2)


def candidate_precisions(device: torch.device) -> list[str]:
    """fp32 always; bf16 where it has hardware support; fp16 on CUDA."""
    cls = device_class(device)
    out = ["fp32"]
    if cls.startswith("cuda"):
        out += (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    elif cls in ("cpu-amx", "cpu-avx512bf16"):
        out.append("bf16")
    return out


def _timed_extract(model, paths: list[Path], device: torch.device, precision: str, batch_size: int) -> tuple:
    extract_global(model, paths[:batch_size], device, batch_size, use_cache=False, progress=False, precision=precision)
    t0 = time.perf_counter()
    d = extract_global(model, paths, device, batch_size, use_cache=False, progress=False, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return d, (time.perf_counter() - t0) * 1000 / len(paths)


def run_precision_check(
    model,
    device: torch.device,
    data: str | Path | None = None,
    batch_size: int = 16,
    precisions: list[str] | None = None,
    compiled: bool = True,
) -> dict:
    """The check's record for ``model`` on ``device`` (see the module docstring); not saved.
    ``compiled``: also run each reduced precision with the backbone compiled (its ``compiled``
    runs: ``--compile auto`` compiles a reduced precision only where they hold recall)."""
    root = find_shared_data(data)
    db_spec, q_spec, tolerance = CHECK_DATASET
    ds = open_dataset(root / db_spec, root / q_spec, options=LayoutOptions(frame_tolerance=tolerance))
    runs: dict[str, dict] = {}
    reference: np.ndarray | None = None
    compiled_runs: dict[str, dict] = {}
    chosen = precisions or candidate_precisions(device)
    passes = [(p, False) for p in chosen] + [(p, True) for p in chosen if compiled and p != "fp32"]
    for precision, compile_ in passes:
        prepare_inference(model, device, compile="on" if compile_ else "off")
        db, db_ms = _timed_extract(model, list(ds.database.paths), device, precision, batch_size)
        q, q_ms = _timed_extract(model, list(ds.queries.paths), device, precision, batch_size)
        ids = FlatIndex.build(db).search(q, 1)[1]
        both = np.concatenate([db, q])
        run = {
            "recall_at_1": recall_at_n(ids, ds.positives, ns=[1])["1"],
            "ms_per_image": (db_ms * len(db) + q_ms * len(q)) / len(both),
        }
        if reference is None:
            reference = both
        else:
            run["min_cosine"] = float(np.min(np.sum(both * reference, axis=1)))
            run["max_abs_diff"] = float(np.max(np.abs(both - reference)))
        (compiled_runs if compile_ else runs)[precision] = run
    prepare_inference(model, device, compile="off")
    record = {
        "model": model.name,
        "device_class": device_class(device),
        "weights_id": model.weights_id,
        "input_size": list(model.preprocess.size),
        "dataset": f"{db_spec} -> {q_spec}, |i-j| <= {tolerance}",
        "queries": len(ds.queries),
        "database": len(ds.database),
        "batch_size": batch_size,
        "recall_tolerance": RECALL_TOLERANCE,
        "precisions": runs,
        **({"compiled": compiled_runs} if compiled_runs else {}),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "measured": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    record["chosen"] = choose_precision(record)
    return record


def save_precision_check(record: dict) -> Path:
    """Store ``record`` where ``--precision auto`` looks first (atomically)."""
    path = check_record_path(record["model"], record["device_class"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return path
