"""``--runtime openvino``: extraction on the exported model instead of PyTorch (CPU).

Why: measured side by side on this project's 2-core CPU (``benchmarks/results/onnx_runtime.json``,
EfficientNet-Lite0 + GeM at 360x640), ONNX Runtime (graph optimisation ALL) and OpenVINO both
run the *fp32* graph faster than PyTorch's best path (torch.compile + bf16), with descriptors
equal to PyTorch fp32 (max difference ~3e-7); OpenVINO is the faster of the two (6.4-7.1x eager
PyTorch fp32 against 5.3-6.7x) and also runs bf16 (11-15x), so it is the one kept as a runtime
(ONNX Runtime only checks exported files: a long-lived ONNX Runtime session and OpenVINO in one
process corrupted the heap here, reproduced under pytest). ``auto`` (the default: PyTorch on a
GPU, in training, for what cannot be exported and for a job too small to repay the export; never
OpenVINO in a process that has loaded ONNX Runtime) picks it for a large CPU job.

The model is exported once per (model, weights, input size) with
:func:`placerank.models.onnx_export.export_onnx` (checked against PyTorch on export) into the
cache root (``exported/``), then loaded into an OpenVINO compiled model. Local-head outputs (FoL region scores, SelaVPR's dense map) are turned into
:class:`~placerank.models.base.LocalFeatures` by
:func:`placerank.models.onnx_outputs.local_features_from_outputs`, so one pass still gives global
and local features. Precision: fp32 or bf16 (OpenVINO's
``INFERENCE_PRECISION_HINT``). The descriptor cache is keyed by precision and, below fp32, by
runtime: fp32 descriptors of every runtime agree to 1e-5 and share it; OpenVINO's bf16 ones are
as far from PyTorch's bf16 as either is from fp32 (``benchmarks/extraction.py``), so they do not.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from placerank.errors import PlaceRankError, warn
from placerank.utils import cache_root

RUNTIMES = ("torch", "openvino")
RUNTIME_ENV = "PLACERANK_RUNTIME"  # the commands' --runtime default when set (else auto)
RUNTIME_ATTR = "placerank_runtime"  # where prepare_inference records a model's runtime
EXPORTS_KEPT = 8  # exported files kept in the cache, most recently used first (prune_exports)
# auto exports for a job of this many images: Lite0's 6-8 s export saves ~45 ms an image (70 -> 25 ms
# with decode at 360x640), repaid at ~180; a slower export (up to ~35 s) is repaid on reuse (docs/inference.md)
EXPORT_MIN_IMAGES = 256
_PACKAGES = {"openvino": "openvino"}
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(runtime, precision): encoder}


def default_runtime() -> str:
    """The runtime when none is asked for: ``$PLACERANK_RUNTIME`` (checked where it is used), else
    ``auto``. The test suite sets it to ``torch``: its process also loads ONNX Runtime to check
    exports, and OpenVINO is exercised in child processes (tests/descriptors/openvino_checks.py)."""
    return os.environ.get(RUNTIME_ENV) or "auto"


def numerics(precision: str, runtime: str) -> str:
    """What a model's descriptors depend on beyond the model and its input: the precision and,
    below fp32, the runtime (``bf16`` on PyTorch, ``bf16+openvino``). fp32 descriptors of every
    runtime agree to 1e-5, so they share one label; bf16 ones of two runtimes differ as much as
    each differs from fp32 (cosine ~0.99), so they must never meet in one cache, folder or database."""
    return precision if precision == "fp32" or runtime == "torch" else f"{precision}+{runtime}"


def check_runtime(runtime: str, device: torch.device, precision: str | None = None) -> str:
    """``runtime`` if it can run here at ``precision``; else one line (before any work)."""
    if runtime not in (*RUNTIMES, "auto"):
        source = f" (from {RUNTIME_ENV})" if os.environ.get(RUNTIME_ENV) == runtime else ""
        raise PlaceRankError(f"--runtime {runtime}{source}: use one of auto, {', '.join(RUNTIMES)}")
    if runtime in ("torch", "auto"):
        return runtime
    if device.type != "cpu":
        raise PlaceRankError(f"--runtime {runtime} runs on the CPU (the device is {device}); use --runtime torch")
    allowed = ("fp32", "bf16")
    if precision not in (None, "auto", *allowed):
        raise PlaceRankError(f"--runtime {runtime} runs {' or '.join(allowed)}, not --precision {precision}")
    if importlib.util.find_spec(_PACKAGES[runtime]) is None:  # found, not loaded: loading is the encoder's
        raise PlaceRankError(
            f"--runtime {runtime} needs the {_PACKAGES[runtime]} package: pip install 'placerank[export]'"
        )
    return runtime


def choose_runtime(requested: str, model, device: torch.device, images: int = 0) -> str:
    """``auto`` -> ``openvino`` on a CPU where it is installed, for a model that exports (no
    uninitialised NetVLAD), when the model is exported already or ``images`` (to extract) repay
    the export (:data:`EXPORT_MIN_IMAGES`); else ``torch``. Never in a process that has loaded ONNX
    Runtime (the one pairing that has corrupted the heap here, docs/inference.md): a host program
    or a test run that uses it keeps PyTorch. Other values are returned as given."""
    if requested != "auto":
        return requested
    if device.type != "cpu" or getattr(model, "needs_data_init", False) or "onnxruntime" in sys.modules:
        return "torch"
    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnx") is None:
        return "torch"
    return "openvino" if exported_path(model).is_file() or images >= EXPORT_MIN_IMAGES else "torch"


def exported_path(model) -> Path:
    h, w = model.preprocess.size
    return cache_root() / "exported" / f"{model.name}-{model.weights_id}-{h}x{w}.onnx"


def export_once(model) -> Path:
    """The model's exported file in the cache root, exported (and checked) the first time; the
    folder keeps the :data:`EXPORTS_KEPT` most recently used files (:func:`prune_exports`)."""
    from placerank.models.onnx_export import export_onnx

    path = exported_path(model)
    if path.is_file():
        with contextlib.suppress(OSError):  # a read-only cache still serves the file
            os.utime(path)  # recently used: kept by the pruning
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(copy.deepcopy(model).cpu(), path, check_with="openvino")
    prune_exports(path.parent, keep=path)
    return path


def prune_exports(folder: Path, keep: Path, limit: int | None = None) -> list[Path]:
    """Delete all but the ``limit`` (default :data:`EXPORTS_KEPT`) most recently used ``*.onnx``
    files of ``folder``, never ``keep``; returns what was deleted. Why: with ``--runtime auto`` the
    default, every model with new weights is exported once (14 MB for Lite0 + GeM), and a model whose heads are
    drawn at random on each construction (an untrained FoL / SelaVPR head) has new weights on every
    run. A file another process still has loaded is safe to delete (OpenVINO read it at load); one
    it was about to load is exported again."""
    limit = EXPORTS_KEPT if limit is None else limit
    files = []
    for f in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):
            files.append((f.stat().st_mtime, f))
    files.sort(reverse=True)
    gone = [f for _, f in files if f != keep][max(0, limit - 1) :]
    for f in gone:
        with contextlib.suppress(OSError):
            f.unlink()
    return gone


class ExportedEncoder:
    """``encode(images, sizes, local_options) -> (global (B, D) tensor, local list | None)`` on the
    exported file, the same contract as :meth:`VPRModel.encode`."""

    def __init__(self, model, runtime: str, precision: str):
        from placerank.models.onnx_export import read_metadata

        self.runtime, self.precision = runtime, precision
        path = export_once(model)
        self.meta = read_metadata(path)
        self.names = list(self.meta["outputs"])
        import openvino as ov

        hint = "bf16" if precision == "bf16" else "f32"
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._ports = [self._compiled.output(n) for n in self.names]
        self._lock = threading.Lock()

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:  # a compiled model's call reuses one infer request: one caller at a time
            result = self._compiled(x)
            return {n: np.array(result[p]) for n, p in zip(self.names, self._ports)}

    def encode(self, images: torch.Tensor, sizes, local_options: dict | None = None):
        from placerank.models.onnx_outputs import local_features_from_outputs

        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        out = self._run(x)
        g = torch.nn.functional.normalize(torch.from_numpy(np.asarray(out["global"], dtype=np.float32)), dim=-1)
        if local_options is None:
            return g, None
        mode = local_options.get("mode")
        if mode is not None and mode != self.meta.get("local_mode"):
            raise PlaceRankError(
                f"--runtime {self.runtime}: {self.meta['model']} was exported with local_mode"
                f" {self.meta.get('local_mode')}, not {mode}; use --runtime torch"
            )
        return g, local_features_from_outputs(self.meta, out, sizes, local_options.get("num_regions"))


def exported_encoder(model, runtime: str, precision: str) -> ExportedEncoder | None:
    """One encoder per model, runtime and precision for the life of the model object; None for
    ``torch``, or when the model cannot be exported / loaded (one warning, then PyTorch runs it:
    the model's runtime becomes ``torch``)."""
    if runtime in ("torch", "auto"):
        return None
    per_model = _ENCODERS.setdefault(model, {})
    key = (runtime, precision, model.weights_id)
    if key not in per_model:
        try:
            per_model[key] = ExportedEncoder(model, runtime, precision)
        except Exception as e:  # an op the exporter or the runtime cannot take: PyTorch runs it
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            warn(f"--runtime {runtime} cannot run {model.name} ({text}); running it with torch")
            setattr(model, RUNTIME_ATTR, "torch")
            return None
    return per_model[key]
