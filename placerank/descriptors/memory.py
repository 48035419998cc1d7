"""The memory budget of extraction (``--max-memory-gb``): the batch size is cut so the process's
peak resident memory stays under the budget.

Why a budget and not only ``--batch-size``: an image's activations grow with the input size
(``effnet-lite0-gem`` at 360x640 needs ~9x what it needs at 112x192), so a batch size that is
fine for one model runs a laptop out of memory with another. The budget is in the unit people
know (GB of RAM) and the batch size follows from it.

How the batch is sized (:func:`fit_batch_size`): ``min(batch_size, fit)`` where
``fit = (budget - resident now - headroom) / per image``, and ``per image`` is measured once per
model, input size and device (:func:`per_image_bytes`): a probe forward of :data:`PROBE_IMAGES`
images with the peak-RSS counter reset just before (Linux ``/proc/self/clear_refs``), divided by
the images; on CUDA the activations are in GPU memory and only the input tensors count. The
probe runs only when a generous bound (:data:`GENEROUS_FACTOR` x the input tensor per image)
does not already fit, so small jobs (tests, one query) never pay for it. To that
come the input tensors the DataLoader workers have prefetched (``prefetch_factor`` x workers
batches). Where the peak counter cannot be reset, the probe's sum of module output sizes stands
in (an estimate: inference frees most of them early, so it errs on the safe side).

A budget below the model's own size (parameters + buffers) is a one-line error; a budget that
the process already exceeds before extraction runs batches of 1 with one warning.
The budget is per process: with ``--nproc N`` / torchrun each rank has it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from placerank.errors import PlaceRankError, warn

DEFAULT_MAX_MEMORY_GB = 4.0  # a laptop with 8 GB: half of it for placerank
if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports this module to parse flags
    import torch

PROBE_IMAGES = 2
HEADROOM_BYTES = 256 * 2**20  # DataLoader bookkeeping, the cache's SQLite pages, numpy copies
GENEROUS_FACTOR = 128  # x the input tensor: above any per-image forward measured here (CNNs ~33x)
PREFETCH_FACTOR = 4  # batches each DataLoader worker holds ahead (placerank.data.images.make_loader)

_budget_gb: float = DEFAULT_MAX_MEMORY_GB
_probed: dict[tuple, int] = {}  # (model name, input size, device) -> bytes per image
_warned: set[float] = set()


def max_memory_gb() -> float:
    """The budget extraction in this process sizes its batches for."""
    return _budget_gb


@contextlib.contextmanager
def memory_budget(gb: float | None) -> Iterator[None]:
    """Extraction inside the block keeps peak RSS under ``gb`` (None: leave the budget as it is)."""
    global _budget_gb
    if gb is None:
        yield
        return
    if not gb > 0:
        raise PlaceRankError(f"--max-memory-gb must be a number > 0, got {gb}")
    before, _budget_gb = _budget_gb, float(gb)
    try:
        yield
    finally:
        _budget_gb = before


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int:
    """Resident memory of this process now (Linux); else the peak so far (``ru_maxrss``)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def input_bytes(model) -> int:
    """Bytes of one preprocessed image (float32, 3 x H x W at the model's input size)."""
    h, w = model.preprocess.size
    return int(3 * h * w * 4)


def per_image_bytes(model, device: torch.device) -> int:
    """Peak memory one image adds to a forward, measured once per process for each model name,
    input size and device (two instances of one model need the same)."""
    import torch

    key = (getattr(model, "name", type(model).__name__), tuple(model.preprocess.size), str(device))
    if key in _probed:
        return _probed[key]
    x = torch.zeros((PROBE_IMAGES, 3, *model.preprocess.size), device=device)
    sizes = [tuple(model.preprocess.size)] * PROBE_IMAGES
    model.eval()
    with torch.inference_mode():
        bytes_ = _probe(model, x, sizes, device)
    _probed[key] = int(bytes_)
    return int(bytes_)


def _probe(model, x: torch.Tensor, sizes, device: torch.device) -> int:
    if device.type == "cuda":
        bytes_ = input_bytes(model)
    elif _reset_peak():
        before = _status_kb("VmRSS") or 0
        _forward(model, x, sizes)
        bytes_ = max(((_status_kb("VmHWM") or 0) - before) * 1024 // PROBE_IMAGES, input_bytes(model))
    else:
        bytes_ = _output_sum(model, x, sizes) // PROBE_IMAGES
    return int(bytes_)


def _forward(model, x: torch.Tensor, sizes) -> None:
    if hasattr(model, "encode"):
        model.encode(x, sizes, local_options=None)
    else:
        model(x)


def _output_sum(model, x: torch.Tensor, sizes) -> int:
    """Sum of every leaf module's output bytes in one forward (the estimate where RSS peaks
    cannot be measured)."""
    total = 0

    def hook(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    import torch

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        _forward(model, x, sizes)
    finally:
        for h in handles:
            h.remove()
    return total + x.numel() * x.element_size()


def fit_batch_size(
    model, batch_size: int, device: torch.device, num_workers: int = 0, budget_gb: float | None = None
) -> int:
    """``min(batch_size, fit)``: the largest batch whose forward, plus the batches the loader
    workers hold, keeps this process under the budget (module docstring)."""
    gb = max_memory_gb() if budget_gb is None else budget_gb
    budget = int(gb * 2**30)
    own = model_bytes(model)
    if budget < own:
        raise PlaceRankError(
            f"--max-memory-gb {gb:g} is below the size of {getattr(model, 'name', 'the model')} itself"
            f" ({own / 2**30:.2f} GB); give at least {own / 2**30 + 0.5:.1f}"
        )
    if batch_size <= 1:
        return 1  # nothing to cut: no probe forward (one query image, a service request)
    prefetch = input_bytes(model) * PREFETCH_FACTOR * max(0, num_workers)
    free = budget - resident_bytes() - HEADROOM_BYTES
    if batch_size * (GENEROUS_FACTOR * input_bytes(model) + prefetch) <= free:
        return batch_size  # fits even at a generous bound: no probe forward needed
    per_image = per_image_bytes(model, device) + prefetch
    fit = max(1, free // max(1, per_image))
    if free < per_image and gb not in _warned:
        _warned.add(gb)
        warn(
            f"--max-memory-gb {gb:g}: this process already holds {resident_bytes() / 2**30:.2f} GB;"
            " extracting one image at a time and the budget may still be exceeded"
        )
    return int(min(batch_size, fit))


def workers_for(num_workers: int | None) -> int:
    """The DataLoader workers ``make_loader`` starts for ``num_workers`` (None: min(4, CPUs))."""
    return min(4, max(1, os.cpu_count() or 2)) if num_workers is None else int(num_workers)
