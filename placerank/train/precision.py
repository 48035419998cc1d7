"""Mixed-precision training: ``placerank train --precision auto|fp32|bf16|fp16``.

Why one module: the three loops (FoL, SelaVPR, SFRS) share one rule, so each loop only asks a
:class:`TrainPrecision` for two things — a context for the network's forward and the
``backward`` / ``step`` pair — and the rule (what runs in reduced precision, what never does) is
written and tested once.

The rule:

- The **network forward** (backbone, adapters, aggregator convolutions / linears) runs under
  ``torch.autocast(device.type, dtype)``: the matrix products are where the time is.
- **Losses run in float32** with autocast switched off and every input cast up
  (:meth:`TrainPrecision.fp32`): the multi-similarity loss exponentiates 50 x similarities, SARE
  and the soft region loss divide by temperatures of 0.05-0.07 before a softmax, and the
  mutual-nearest-neighbour and pseudo-correspondence miners threshold cosines — in bf16 (8 bits
  of mantissa, ~3 significant digits) those move. FoL's Sinkhorn (``sinkhorn_log``) already
  casts its logits to float32 and runs only ops autocast leaves in the input's type, so its plan
  is float32 inside the forward too (asserted in ``tests/train/test_train_precision.py``).
- **Master weights and the optimizer stay float32**: autocast only casts copies of the weights
  for each op; the parameters, their gradients and Adam/SGD state are float32.
- fp16 (CUDA only) needs loss scaling: a ``torch.amp.GradScaler`` scales the loss before
  ``backward`` and unscales / skips the step on overflow. bf16 has fp32's exponent range and
  needs no scaler.
- Off the training step everything stays float32: validation (so every epoch, and the untrained
  start, are scored by the same function, and the selected ``model.pt``'s recall is the one fp32
  inference reproduces), SelaVPR's and SFRS's mining passes, SFRS's k-means and PCA-whitening.

``auto`` takes bf16 only for a method whose measured held-out recall and loss curve held against
fp32 (``benchmarks/train_precision.py``, docs/training.md, "Precision"); fp32 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, TypeVar

import torch

from placerank.errors import PlaceRankError

TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")

#: ``--precision auto`` per (method, device type). CPU: what benchmarks/train_precision.py measured
#: (benchmarks/results/train_precision.json): under bf16 FoL kept held-out R@1 (+1.25 points,
#: 3 seeds x 2 pairs) and its loss curve at a 1.1-1.2x faster step; SelaVPR the same R@1 (2 seeds)
#: and a loss within 0.002 (2 %) of fp32's at every step, 1.48x faster per step. SFRS was not
#: measured. CUDA: FoL's fp16 AMP is the official script's (this project's FoL default on CUDA
#: before ``--precision``; not measured here). Missing here: fp32 under ``auto``.
AUTO_PRECISION: dict[tuple[str, str], str] = {
    ("fol", "cpu"): "bf16",
    ("selavpr", "cpu"): "bf16",
    ("fol", "cuda"): "fp16",
}


def resolve_train_precision(requested: str, method: str, device: torch.device) -> str:
    """The concrete precision of a run: ``auto`` -> :data:`AUTO_PRECISION` (fp32 when a
    method was not measured); ``fp16`` off CUDA and unknown names are one line."""
    if requested == "auto":
        return AUTO_PRECISION.get((method, device.type), "fp32")
    return check_train_precision(requested, device)


def check_train_precision(precision: str, device: torch.device) -> str:
    """``precision`` if a run on ``device`` can train in it; else one line (before any work)."""
    if precision not in TRAIN_PRECISIONS[1:]:
        raise PlaceRankError(f"--precision {precision}: use one of {', '.join(TRAIN_PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise PlaceRankError(
            f"--precision fp16 trains on CUDA only (it needs a GradScaler; the device is {device.type});"
            " use --precision bf16 or fp32"
        )
    return precision


def to_fp32(value: Any) -> Any:
    """``value`` with every floating tensor cast to float32 (through tuples, lists, dicts and
    dataclass instances such as FoL's output); the casts keep autograd."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: to_fp32(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: to_fp32(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


class TrainPrecision:
    """One run's precision: the forward's autocast, the float32 loss region and the
    (scaled, for fp16) backward and optimizer step. ``fp32`` makes every method a no-op."""

    def __init__(self, precision: str, device: torch.device):
        self.precision = check_train_precision(precision, device)
        self.device = device
        self.dtype = _DTYPES.get(precision, torch.float32)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    @classmethod
    def of(cls, config, device: torch.device) -> TrainPrecision:
        """A run's precision from its TrainConfig (``auto`` resolved for its method and device)."""
        return cls(resolve_train_precision(getattr(config, "precision", "fp32"), config.method, device), device)

    @property
    def reduced(self) -> bool:
        return self.precision != "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The network forward's context: autocast to bf16 / fp16, nothing in fp32."""
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def full(self) -> contextlib.AbstractContextManager:
        """Autocast off (inside :meth:`autocast` too): what runs here runs in float32 when its
        inputs are float32 (:func:`to_fp32`)."""
        if not self.reduced:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    def fp32(self, value: T) -> T:
        """:func:`to_fp32` of a forward's outputs (the identity in fp32); same structure and types."""
        return to_fp32(value) if self.reduced else value

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step on float32 gradients (fp16: unscaled, skipped on inf / NaN)."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
