"""The fast inference path: channels_last, torch.compile when it repays itself, and
``--precision auto`` chosen from measured recall checks.

Why each piece (measured on this project's 2-core Sapphire Rapids CPU, EfficientNet-Lite0 + GeM,
batch 16 at 360x640; ``benchmarks/extraction.py`` has every model):

- **channels_last** (weights and input) lets oneDNN / cuDNN run convolutions without layout
  reorders: 1.7-2x in fp32 with descriptors equal to ~4e-7. Always on (:func:`prepare_inference`).
- **torch.compile** (inductor) fuses the backbone's element-wise work: another ~1.5x, but a cold
  compile costs ~35 s per model, input size, batch size and precision (~5 s when inductor's
  on-disk cache is warm). ``--compile auto`` compiles only when the images still to extract repay
  that: at least :data:`COLD_MIN_IMAGES` the first time, :data:`WARM_MIN_IMAGES` once this
  machine has compiled the same graph (a marker under the cache root says so; inductor's cache
  is kept under the same root, ``$PLACERANK_CACHE/inductor``, unless ``TORCHINDUCTOR_CACHE_DIR``
  is set). Only the backbone is compiled (the heavy part; the heads return NumPy local
  features), with static shapes: the last, short batch is padded, so nothing recompiles. A
  compile that fails (no C++ compiler, an unsupported op) falls back to eager with one warning.
- **bf16 / fp16** autocast (:mod:`placerank.descriptors.extract`) is faster where the hardware
  has it (AMX / AVX512-BF16, tensor cores), but changes descriptors (cosine ~0.999). ``auto``
  takes the fastest precision whose R@1 on the GardensPoint check (:mod:`placerank.eval.precision_check`,
  ``placerank check-precision``) stays within :data:`RECALL_TOLERANCE` of fp32 for that model on
  that device class; the check's records ship for the registered models (``precision_checks.json``
  beside this file) and a user's own checks (cache root) take precedence. No record: fp32.
  ``--compile auto`` compiles a reduced-precision forward only where the check measured the
  compiled forward holding recall too (:func:`compiled_precision_holds`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from placerank.descriptors.cache import namespace
from placerank.descriptors.runtime import RUNTIME_ATTR, check_runtime, choose_runtime
from placerank.errors import PlaceRankError, warn
from placerank.utils import cache_root, write_json_atomic

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")
COLD_MIN_IMAGES = 1024  # ~35 s cold compile / ~35 ms saved per image at 360x640 (benchmarks/extraction.py)
WARM_MIN_IMAGES = 128  # ~5 s warm compile / the same saving
RECALL_TOLERANCE = 0.005  # R@1 (as a fraction) a reduced precision may lose against fp32
_COMPILE_ATTR = "placerank_compile"
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backbone -> compiled forward


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if this device can run it; else one line (before any work)."""
    if precision not in PRECISIONS:
        raise PlaceRankError(f"--precision {precision}: use one of auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise PlaceRankError(
            f"--precision fp16 needs a CUDA device (the device is {device}); use --precision bf16 or fp32 on CPU"
        )
    return precision


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise PlaceRankError(f"--compile {mode}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def prepare_inference(model, device: torch.device | str, compile: str = "off", runtime: str = "torch"):
    """``model`` on ``device``, in eval mode, with channels_last weights, and the compile mode
    (``auto`` / ``on`` / ``off``) and runtime (``torch`` / ``onnx`` / ``openvino``,
    :mod:`placerank.descriptors.runtime`; ``auto`` here: OpenVINO when the model is exported
    already, else torch — callers that know the job's size decide with
    :func:`~placerank.descriptors.runtime.choose_runtime` first) extraction follows recorded on
    it. Returns the same object."""
    check_compile_mode(compile)
    model = model.to(device).eval()
    check_runtime(runtime, torch.device(device))
    runtime = choose_runtime(runtime, model, torch.device(device))  # auto: OpenVINO once exported
    model.to(memory_format=torch.channels_last)
    setattr(model, _COMPILE_ATTR, compile)
    setattr(model, RUNTIME_ATTR, runtime)
    return model


def runtime_of(model) -> str:
    """The runtime :func:`prepare_inference` recorded on ``model`` (``torch`` if never prepared)."""
    return str(getattr(model, RUNTIME_ATTR, "torch"))


def compile_mode(model) -> str:
    """The compile mode :func:`prepare_inference` recorded on ``model`` (``off`` if never prepared)."""
    return str(getattr(model, _COMPILE_ATTR, "off"))


def as_input(images: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """A batch moved to ``device``; image batches (4-D) in channels_last when asked."""
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def is_prepared(model) -> bool:
    """Whether :func:`prepare_inference` ran on ``model`` (its weights are channels_last, so its
    inputs should be too); an unprepared model keeps the plain eager path."""
    return hasattr(model, _COMPILE_ATTR)


# -- torch.compile ------------------------------------------------------------------------------
def _graph_marker(model, batch_size: int, precision: str, device: torch.device) -> Path:
    """A file that exists once this machine compiled this graph (inductor's cache is then warm)."""
    made = namespace(
        model.name,
        model.preprocess.signature(),
        f"batch={batch_size}",
        f"precision={precision}",
        device.type,
        torch.__version__,
    )
    name = hashlib.sha1(made.encode()).hexdigest()[:24]
    return cache_root() / "inductor" / "placerank-compiled" / f"{name}.json"


def should_compile(model, images: int, batch_size: int, precision: str, device: torch.device) -> bool:
    """Whether extraction of ``images`` images compiles ``model``'s backbone (module docstring)."""
    mode = compile_mode(model)
    if mode != "auto":
        return mode == "on"
    if precision != "fp32" and not compiled_precision_holds(
        find_check(model.name, device_class(device), runtime_of(model)), precision
    ):
        return False
    warm = _graph_marker(model, batch_size, precision, device).exists()
    return images >= (WARM_MIN_IMAGES if warm else COLD_MIN_IMAGES)


class CompiledBackbone(contextlib.AbstractContextManager):
    """Runs batches through ``model`` with its backbone compiled (``enabled``), else eagerly.

    The model's parameters and state dict are untouched: the compiled function is set as the
    backbone instance's ``forward`` on entry and removed on exit. Static shapes: a short batch is
    padded to ``batch_size`` with zero images and the outputs cut back. A compile that fails falls
    back to eager with one warning (:meth:`run`); a finished compiled run leaves the warm marker."""

    def __init__(self, model, batch_size: int, precision: str, device: torch.device, enabled: bool):
        self.model, self.batch_size, self.precision, self.device = model, batch_size, precision, device
        self.active = enabled
        self.ran = False

    def __enter__(self) -> CompiledBackbone:
        if self.active:
            backbone = self.model.backbone
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
            fn = _COMPILED.get(backbone)
            if fn is None:
                fn = torch.compile(backbone.forward, dynamic=False)
                _COMPILED[backbone] = fn
            backbone.forward = fn
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.backbone.__dict__.pop("forward", None)
        if self.active and self.ran and exc_type is None:
            marker = _graph_marker(self.model, self.batch_size, self.precision, self.device)
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(marker, {"model": self.model.name, "batch_size": self.batch_size})

    def run(self, encode: Callable[[torch.Tensor, list], tuple], images: torch.Tensor, sizes: list) -> tuple:
        """``encode(images, sizes) -> (global, local or None)`` on this batch."""
        if not self.active:
            return encode(images, sizes)
        n = images.shape[0]
        try:
            g, local = encode(pad_batch(images, self.batch_size), sizes + [sizes[-1]] * (self.batch_size - n))
        except PlaceRankError:
            raise
        except Exception as e:  # the compile failed: say so once, then eager (which re-raises a real error)
            self._fall_back(e)
            return encode(images, sizes)
        self.ran = True
        return g[:n], (None if local is None else local[:n])

    def _fall_back(self, error: Exception) -> None:
        _COMPILED.pop(self.model.backbone, None)
        self.model.backbone.__dict__.pop("forward", None)
        self.active = False
        setattr(self.model, _COMPILE_ATTR, "off")
        text = str(error).strip()
        first = text.splitlines()[0][:160] if text else ""
        warn(f"torch.compile is unavailable here ({type(error).__name__}: {first}); running eager")


def pad_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``images`` with zero images appended up to ``batch_size`` (a compiled graph's fixed shape)."""
    short = batch_size - images.shape[0]
    if short <= 0:
        return images
    pad = images.new_zeros((short, *images.shape[1:]))
    out = torch.cat([images, pad])
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


# -- --precision auto -----------------------------------------------------------------------------
def device_class(device: torch.device) -> str:
    """What decides whether reduced precision is fast here: ``cpu-amx``, ``cpu-avx512bf16``,
    ``cpu`` (no native bf16), or ``cuda-smXY``."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    if device.type != "cpu":
        return device.type
    if torch.cpu._is_amx_tile_supported():
        return "cpu-amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "cpu-avx512bf16"
    return "cpu"


def user_checks_folder() -> Path:
    return cache_root() / "precision-checks"


def check_record_path(model_name: str, device_cls: str, runtime: str = "torch") -> Path:
    suffix = "" if runtime == "torch" else f"__{runtime}"
    return user_checks_folder() / f"{model_name}__{device_cls}{suffix}.json"


def shipped_checks() -> list[dict]:
    """The records measured for the registered models (``precision_checks.json``)."""
    text = resources.files("placerank.descriptors").joinpath("precision_checks.json").read_text()
    return list(json.loads(text)["checks"])


def find_check(model_name: str, device_cls: str, runtime: str = "torch") -> dict | None:
    """The user's own check for this model, device class and runtime, else the shipped one, else None."""
    path = check_record_path(model_name, device_cls, runtime)
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            warn(f"ignoring the unreadable precision check {path}")
    for record in shipped_checks():
        same = (record.get("model"), record.get("device_class"), record.get("runtime", "torch"))
        if same == (model_name, device_cls, runtime):
            return dict(record)
    return None


def choose_precision(record: dict) -> str:
    """The fastest measured precision whose R@1 is within :data:`RECALL_TOLERANCE` of fp32's."""
    runs = record["precisions"]
    fine = [p for p, r in runs.items() if _recall_holds(runs["fp32"], r)]
    return min(fine, key=lambda p: float(runs[p]["ms_per_image"]))


def _recall_holds(fp32_run: dict, run: dict) -> bool:
    """``run``'s R@1 is at most :data:`RECALL_TOLERANCE` below ``fp32_run``'s."""
    return float(run["recall_at_1"]) >= float(fp32_run["recall_at_1"]) - RECALL_TOLERANCE - 1e-12


def compiled_precision_holds(record: dict | None, precision: str) -> bool:
    """Whether ``--compile auto`` may compile a ``precision`` forward: fp32 always (compiled fp32
    descriptors equal eager ones within 1e-5, tested); a reduced precision only when the model's
    check measured the *compiled* forward at that precision (its ``compiled`` runs) within
    :data:`RECALL_TOLERANCE` of fp32. Why: inductor's fused kernels round differently from eager
    autocast, so eager bf16 holding recall does not mean compiled bf16 does (EfficientNet-Lite0 +
    GeM on this project's CPU: eager bf16 R@1 +0.7 points, compiled bf16 -0.7)."""
    if precision == "fp32":
        return True
    if record is None or precision not in record.get("compiled", {}) or "fp32" not in record.get("precisions", {}):
        return False
    return _recall_holds(record["precisions"]["fp32"], record["compiled"][precision])


def resolve_precision(requested: str, model, device: torch.device) -> str:
    """``auto`` -> the precision the model's check chose on this device class and the model's
    runtime (fp32 without a check); any other value is checked (``fp16`` needs CUDA; what the
    runtime runs) and returned."""
    check_runtime(runtime_of(model), device, requested)
    if requested != "auto":
        return check_precision(requested, device)
    record = find_check(model.name, device_class(device), runtime_of(model))
    return "fp32" if record is None else check_precision(choose_precision(record), device)


def precision_report(model, device: torch.device, precision: str) -> dict:
    """What a run says about its precision: the precision and, when reduced, the recall check it
    rests on (R@1 of fp32 and of this precision, min cosine, where the record came from)."""
    out: dict = {"precision": precision, "compile": compile_mode(model), "runtime": runtime_of(model)}
    if precision == "fp32":
        return out
    record = find_check(model.name, device_class(device), runtime_of(model)) or {}
    runs = record.get("precisions", {})
    if precision in runs and "fp32" in runs:
        out["precision_check"] = {
            "fp32_recall_at_1": runs["fp32"]["recall_at_1"],
            "recall_at_1": runs[precision]["recall_at_1"],
            "min_cosine": runs[precision].get("min_cosine"),
            "dataset": record.get("dataset"),
            "weights_id": record.get("weights_id"),
        }
    return out
