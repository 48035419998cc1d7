"""placerank's own checkpoint format: what training writes and ``--weights`` accepts.

A ``.pt`` file holding ``{"placerank": {"format": 1, "model": NAME, "kwargs": {...}},
"state_dict": ...}``. Loading rebuilds the registered model with those constructor options and
loads the tensors strictly, so a checkpoint for another model is refused in one line.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from placerank.errors import WeightsError
from placerank.utils import atomic_path

FORMAT_VERSION = 1


def save_placerank_checkpoint(
    model, path: str | Path, model_kwargs: dict | None = None, extra: dict | None = None
) -> None:
    payload = {
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


def _read(path: str | Path, mmap: bool = False):
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:
        return None


def is_placerank_checkpoint(path) -> bool:
    p = Path(path)
    if not p.is_file() or p.suffix not in (".pt", ".pth"):
        return False
    # mmap: sniffing a 1.2 GB official checkpoint must not read it all into memory
    obj = _read(p, mmap=zipfile.is_zipfile(p))
    return isinstance(obj, dict) and "placerank" in obj


def load_placerank_checkpoint(path: str | Path, expected_name: str | None = None):
    from placerank.models.registry import create

    obj = _read(path)
    if not (isinstance(obj, dict) and "placerank" in obj):
        raise WeightsError(f"{path}: not a placerank checkpoint")
    meta = obj["placerank"]
    if expected_name is not None and meta["model"] != expected_name:
        raise WeightsError(f"{path}: checkpoint is for model '{meta['model']}', not '{expected_name}'")
    model = create(meta["model"], weights=None, pretrained=False, **meta.get("kwargs", {}))
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"{path}: checkpoint does not match model '{meta['model']}' ({str(e).splitlines()[0][:160]})"
        ) from None
    model.weights_source = f"{Path(path).name} (trained from {meta.get('weights_source') or 'unknown'})"
    model.invalidate_weights_id()
    return model
