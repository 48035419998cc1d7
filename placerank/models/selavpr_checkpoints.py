"""Released SelaVPR checkpoints (``SelaVPR_msls.pth``, ``SelaVPR_pitts30k.pth``,
``SelaVPR_reg4_msls.pth``): a container with ``model_state_dict`` (DataParallel ``module.``
prefix), loaded strictly into a model built on the ``meta`` device."""

from __future__ import annotations

from pathlib import Path

import torch

from placerank.errors import WeightsError
from placerank.models.backbones import DINOV2_CONFIGS
from placerank.models.checkpoints import official_state_dict, read_weights, strict_load
from placerank.models.selavpr import SelaVPRModel, _build_vit
from placerank.utils import file_sha256


def looks_like_official(obj) -> bool:
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        return True
    return isinstance(obj, dict) and any(str(k).endswith("blocks.0.adapter1.D_fc1.weight") for k in obj)


def official_arch(sd: dict[str, torch.Tensor], path) -> tuple[str, int]:
    """(arch, number of register tokens) from the shapes in an official state dict."""
    if "backbone.pos_embed" not in sd:
        raise WeightsError(f"{path}: not a SelaVPR checkpoint (no 'backbone.pos_embed' key)")
    dim = int(sd["backbone.pos_embed"].shape[-1])
    depth = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    for arch, cfg in DINOV2_CONFIGS.items():
        if cfg["embed_dim"] == dim and cfg["depth"] == depth:
            regs = sd.get("backbone.register_tokens")
            return arch, 0 if regs is None else int(regs.shape[1])
    raise WeightsError(f"{path}: SelaVPR checkpoint has a {dim}-d, {depth}-block ViT, not a DINOv2 ViT-S/B/L")


def map_official_keys(sd: dict[str, torch.Tensor], arch: str, path) -> dict[str, torch.Tensor]:
    """Official names -> placerank names; checks the adapters and LocalAdapt are all there.

    The only renamed key is the GeM exponent ``aggregation.1.p`` -> ``aggregator.p``
    (``aggregation.0``/``.2`` are the parameter-free L2-norm and flatten).
    """
    depth = DINOV2_CONFIGS[arch]["depth"]
    for i in range(depth):
        for a in ("adapter1", "adapter2"):
            if f"backbone.blocks.{i}.{a}.D_fc2.weight" not in sd:
                raise WeightsError(f"{path}: SelaVPR checkpoint has no {a} in block {i} (a plain DINOv2 file?)")
    if "LocalAdapt.upconv1.weight" not in sd or "LocalAdapt.upconv2.weight" not in sd:
        raise WeightsError(f"{path}: SelaVPR checkpoint has no LocalAdapt up-convolutions")
    return {("aggregator.p" if k == "aggregation.1.p" else k): v for k, v in sd.items()}


def load_official_selavpr(
    path: str | Path, arch: str = "vitl14", image_size=None, allow_pickle: bool | None = None, obj=None
) -> SelaVPRModel:
    """Build ``selavpr-<arch>`` from a released SelaVPR ``.pth`` and load it strictly.

    The model is built on the ``meta`` device and the checkpoint's (memory-mapped) tensors are
    assigned to it, so no random initialisation of 300 M parameters happens and the weights are
    not held twice. Every key must land: missing, unexpected and wrong-shaped keys are reported
    in one line.
    """
    if obj is None:
        obj = read_weights(path, allow_pickle)
    sd = official_state_dict(obj, path, "SelaVPR")
    found, regs = official_arch(sd, path)
    if found != arch:
        raise WeightsError(f"{path}: SelaVPR checkpoint is for DINOv2 {found}, not {arch}; use --model selavpr-{found}")
    sd = map_official_keys(sd, arch, path)
    with torch.device("meta"):
        model = _build_vit(f"selavpr-{arch}", arch, image_size, num_register_tokens=regs)
    strict_load(model, sd, path, f"selavpr-{arch}", assign=True)
    model.freeze_backbone()
    model.weights_source = f"{Path(path).name} sha256:{file_sha256(path)[:12]} (official SelaVPR)"
    model.official_sanity = {
        "gem_p": float(model.aggregator.p.detach().float().item()),
        "adapters_nonzero": bool(
            any(float(b.adapter1.D_fc2.weight.detach().abs().max()) > 0 for b in model.backbone.blocks)
        ),
    }
    model.invalidate_weights_id()
    return model
