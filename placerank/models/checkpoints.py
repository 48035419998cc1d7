"""The one checkpoint reader: every model and local-feature network loads its weights here.

- :func:`read_weights`: ``torch.load`` with ``weights_only=True`` and ONE allow-list of numpy
  globals (what the official SelaVPR, FoL and OpenIBL training containers hold besides tensors:
  ``recalls`` arrays, ``best_r5`` scalars), memory-mapped for zip files so a 1.4 GB ViT-L file is
  not copied into RAM; ``.safetensors`` files too. A file holding any other pickled object is
  refused in one line naming it, unless ``PLACERANK_ALLOW_PICKLE=1`` (or ``allow_pickle=True``)
  says it is trusted.
- :func:`strict_load` / :func:`check_state`: the key set and every shape must match; missing,
  unexpected and wrong-shaped keys are reported together in one line.
- placerank's own format (what training writes and ``--weights`` accepts): a ``.pt`` file holding
  ``{"placerank": {"format": 1, "model": NAME, "kwargs": {...}}, "state_dict": ...}``; loading
  rebuilds the registered model with those options and loads the tensors strictly.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from placerank.errors import WeightsError
from placerank.models.registry import create
from placerank.utils import atomic_path

FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def safe_numpy_globals() -> list[Any]:
    """The numpy objects allowed inside a ``weights_only`` load: arrays, dtypes and scalars, under
    both NumPy-1 (``numpy.core``) and NumPy-2 (``numpy._core``) module names; nothing executable."""
    try:
        from numpy._core import multiarray as ma  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray as ma  # type: ignore[no-redef]
    out: list[Any] = [np.ndarray, np.dtype]
    for fn in ("_reconstruct", "scalar"):
        obj = getattr(ma, fn)
        out += [(obj, f"numpy.core.multiarray.{fn}"), (obj, f"numpy._core.multiarray.{fn}")]
    # dtype classes (np.dtypes.Float64DType ...) appear in pickles of some NumPy versions
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return out


def allow_pickle_default() -> bool:
    """``PLACERANK_ALLOW_PICKLE=1`` (or true/yes): load trusted files with ``weights_only=False``."""
    return os.environ.get("PLACERANK_ALLOW_PICKLE", "") in ("1", "true", "yes")


def _first_line(e: object, n: int = 120) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else ""


def _refused_globals(path: Path, error: BaseException) -> str:
    """What a refused file holds besides the allowed globals, for the one-line error."""
    try:
        allowed = {o[1] if isinstance(o, tuple) else f"{o.__module__}.{o.__qualname__}" for o in safe_numpy_globals()}
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:
        names = []
    return ", ".join(names[:3]) if names else _first_line(error, 100)


def read_weights(path: str | Path, allow_pickle: bool | None = None) -> Any:
    """Read a weights file safely (see the module docstring); every failure is one
    :class:`WeightsError` line starting with the path."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    if allow_pickle is None:
        allow_pickle = allow_pickle_default()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) torch files cannot be memory-mapped
        with torch.serialization.safe_globals(safe_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a refusal: a corrupt or foreign file
            detail = str(e).split("WeightsUnpickler error:", 1)[-1].strip()
            raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {_first_line(detail)})") from None
        if not allow_pickle:
            raise WeightsError(
                f"{path}: file holds pickled objects that weights_only loading refuses ({_refused_globals(path, e)}); "
                f"if you trust it, set PLACERANK_ALLOW_PICKLE=1 to load it with weights_only=False"
            ) from None
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {_first_line(e)})") from None
    try:  # trusted by the user: full unpickling
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {_first_line(e)})") from None


def state_dict_of(obj: Any, path: str | Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    """``obj[key]`` when ``obj`` is a container holding a dict there, else ``obj``; must be a
    dict (a state dict), otherwise one line."""
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state_dict, found {type(obj).__name__}")
    return obj


def official_state_dict(obj: Any, path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A released training container (SelaVPR, FoL) -> flat state dict: ``model_state_dict`` (or
    a bare dict of tensors), DataParallel's ``module.`` prefix stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a {what} checkpoint (expected a dict with 'model_state_dict' of tensors)")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict (or one under a ``state_dict`` key) from a ``.pth``/``.safetensors``."""
    return state_dict_of(read_weights(path), path)


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------


def _abbrev(names: Sequence[str], n: int = 3) -> str:
    names = sorted(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def state_diff(expected: Mapping[str, Sequence[int]], state: Mapping[str, Any]) -> str:
    """'' when ``state`` has exactly the keys of ``expected`` with those shapes; otherwise one
    line: ``missing a, b and 3 more; unexpected c; k is (1, 2) in the file but (2, 2) in the model``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if missing:
        parts.append(f"missing {_abbrev(missing)}")
    if unexpected:
        parts.append(f"unexpected {_abbrev(unexpected)}")
    bad = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if bad:
        k = bad[0]
        more = f"; {len(bad) - 1} more tensors differ" if len(bad) > 1 else ""
        parts.append(f"{k} is {tuple(state[k].shape)} in the file but {tuple(expected[k])} in the model{more}")
    return "; ".join(parts)


def check_state(expected: Mapping[str, Sequence[int]], state: Any, path: str | Path, what: str) -> None:
    """Raise one line ``PATH: weights do not fit WHAT (...)`` unless ``state`` is a dict of
    tensors with exactly the keys and shapes of ``expected``."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: weights do not fit {what} (expected a state_dict of tensors)")
    diff = state_diff(expected, state)
    if diff:
        raise WeightsError(f"{path}: weights do not fit {what} ({diff})")


def strict_load(
    module: nn.Module,
    state: Any,
    path: str | Path,
    what: str,
    computed_buffers: Sequence[str] = (),
    assign: bool = False,
) -> None:
    """Load ``state`` into ``module`` with ``strict=True`` after checking names and shapes.

    ``computed_buffers`` are buffers the architecture derives from its configuration (a
    coordinate grid, confidence thresholds) that checkpoints do not carry; they are taken from
    the freshly built module, never from the file, and the file may not contain them either.
    ``assign``: the module lives on the ``meta`` device; the file's (memory-mapped) tensors are
    assigned, cast to the module's dtypes, and every tensor must end up initialised.
    """
    own = module.state_dict()
    skip = set(computed_buffers)
    check_state({k: tuple(v.shape) for k, v in own.items() if k not in skip}, state, path, what)
    full = {k: (v if not assign or v.dtype == own[k].dtype else v.to(own[k].dtype)) for k, v in state.items()}
    for k in computed_buffers:
        full[k] = own[k]
    module.load_state_dict(full, strict=True, assign=assign)
    if assign:
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:  # a buffer outside the state dict would stay uninitialised
            raise WeightsError(f"{path}: {len(left)} tensors of {what} not initialised by the file, e.g. {left[0]}")


# ---------------------------------------------------------------------------------------------
# placerank's own checkpoints
# ---------------------------------------------------------------------------------------------


def save_placerank_checkpoint(
    model, path: str | Path, model_kwargs: dict | None = None, extra: dict | None = None
) -> None:
    payload: dict[str, Any] = {
        "placerank": {
            "format": FORMAT_VERSION,
            "model": model.name,
            "kwargs": dict(model_kwargs or {}),
            "weights_source": getattr(model, "weights_source", ""),
        },
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload["extra"] = extra
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def is_placerank_checkpoint(path) -> bool:
    """Sniff a file (memory-mapped: a 1.2 GB official checkpoint is not read into memory)."""
    p = Path(path)
    if not p.is_file() or p.suffix not in (".pt", ".pth"):
        return False
    return is_placerank_payload(_sniff(p))


def is_placerank_payload(obj: Any) -> bool:
    return isinstance(obj, dict) and "placerank" in obj


def _sniff(path: Path) -> Any:
    try:
        return read_weights(path, allow_pickle=False)
    except WeightsError:
        return None


def load_placerank_checkpoint(path: str | Path, expected_name: str | None = None, obj: Any = None):
    """Rebuild the registered model a placerank checkpoint names and load it strictly; ``obj``:
    the file's content when the caller has read it already (a file is read once)."""
    if obj is None:
        obj = _sniff(Path(path))
    if not is_placerank_payload(obj):
        raise WeightsError(f"{path}: not a placerank checkpoint")
    meta = obj["placerank"]
    if expected_name is not None and meta["model"] != expected_name:
        raise WeightsError(f"{path}: checkpoint is for model '{meta['model']}', not '{expected_name}'")
    model = create(meta["model"], weights=None, pretrained=False, **meta.get("kwargs", {}))
    strict_load(model, obj["state_dict"], path, f"model '{meta['model']}'")
    model.weights_source = f"{Path(path).name} (trained from {meta.get('weights_source') or 'unknown'})"
    model.invalidate_weights_id()
    return model
