"""Official FoL checkpoints (``FoL_large.pth`` / ``FoL_base.pth``, spec fol.md §7): a dict with
``model_state_dict`` (DataParallel ``module.`` prefix, the whole DINOv2 inside), loaded strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from placerank.errors import WeightsError
from placerank.models.backbones import DINOV2_CONFIGS
from placerank.models.checkpoints import official_state_dict, read_weights, strict_load
from placerank.models.fol import ARCH_LABEL, FoLModel


def _arch_of(sd: dict[str, torch.Tensor]) -> str | None:
    pe = sd.get("backbone.model.pos_embed")
    if pe is None:
        return None
    depth = len({k.split(".")[3] for k in sd if k.startswith("backbone.model.blocks.")})
    for arch, cfg in DINOV2_CONFIGS.items():
        if cfg["embed_dim"] == pe.shape[-1] and cfg["depth"] == depth:
            return arch
    return None


def load_official_fol(model: FoLModel, path: str | Path, obj: Any = None) -> None:
    """Strict load of an official FoL checkpoint into ``model`` (which may live on the meta
    device: tensors are then assigned, not copied, halving peak memory for ViT-L); ``obj``: the
    file's content when the caller has read it already."""
    sd = official_state_dict(read_weights(path) if obj is None else obj, path, "FoL")
    arch = model.backbone.arch
    found = _arch_of(sd)
    if found is not None and found != arch:
        raise WeightsError(
            f"{path}: checkpoint holds FoL {ARCH_LABEL[found]}, not {ARCH_LABEL[arch]}; use --model fol-{found}"
        )
    on_meta = any(t.is_meta for t in model.state_dict().values())
    strict_load(model, sd, path, f"FoL {ARCH_LABEL[arch]}", assign=on_meta)
    model.backbone.set_trainable()
    model.invalidate_weights_id()


def is_official_layout(obj) -> bool:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        return True
    return isinstance(obj, dict) and any(
        isinstance(k, str) and (k.startswith("backbone.model.") or k.startswith("module.backbone.model.")) for k in obj
    )
