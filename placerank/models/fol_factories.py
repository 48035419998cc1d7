"""Registry entries ``fol-effnet-lite{0,1,2}`` and ``fol-vit{s,b,l}14`` and their builders (see
:mod:`placerank.models.fol`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from placerank.data.images import normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import EFFNET_LITES, EFFNET_STAGE_CHANNELS, effnet_variant
from placerank.models.checkpoints import is_placerank_checkpoint, load_placerank_checkpoint, read_weights
from placerank.models.fol import (
    ARCH_LABEL,
    CNN_PREPROCESS,
    LOCAL_MODES,
    OFFICIAL_FILES,
    VIT_LOCAL_MODE,
    VIT_PREPROCESS,
    FoLConfig,
    FoLModel,
)
from placerank.models.fol_backbones import FoLCNNBackbone, FoLViTBackbone
from placerank.models.fol_checkpoints import is_official_layout, load_official_fol
from placerank.models.registry import register_model
from placerank.models.weights import resolve_weights
from placerank.utils import file_sha256

# ---------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------


def _config(num_regions, local_mode, train_blocks) -> FoLConfig:
    d = FoLConfig()
    num_regions = d.num_regions if num_regions is None else num_regions
    local_mode = d.local_mode if local_mode is None else local_mode
    train_blocks = d.train_blocks if train_blocks is None else train_blocks
    if local_mode not in LOCAL_MODES:
        raise WeightsError(f"unknown FoL local_mode '{local_mode}' (known: {', '.join(LOCAL_MODES)})")
    if int(num_regions) < 1:
        raise WeightsError(f"num_regions must be >= 1, got {num_regions}")
    return FoLConfig(num_regions=int(num_regions), local_mode=local_mode, train_blocks=int(train_blocks))


def apply_overrides(model: FoLModel, image_size=None, num_regions=None, local_mode=None) -> FoLModel:
    """Inference options given explicitly when loading a placerank checkpoint (e.g. evaluate a
    model trained at 240 x 432 at 360 x 640): weights are unchanged, only the input size or the
    region selection differ."""
    size = normalize_image_size(image_size)
    if size is not None:
        if isinstance(model.backbone, FoLViTBackbone) and (size[0] % 14 or size[1] % 14):
            raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
        model.preprocess = model.preprocess.with_size(size)
    if num_regions is not None or local_mode is not None:
        cfg = _config(
            num_regions if num_regions is not None else model.cfg.num_regions,
            local_mode if local_mode is not None else model.cfg.local_mode,
            model.cfg.train_blocks,
        )
        model.cfg = dataclasses.replace(model.cfg, num_regions=cfg.num_regions, local_mode=cfg.local_mode)
        model.aggregator.cfg = model.cfg
    return model


def build_fol_vit(
    arch: str,
    image_size=None,
    num_regions: int | None = None,
    local_mode: str | None = None,
    train_blocks: int | None = None,
    name: str | None = None,
) -> FoLModel:
    """Randomly initialised FoL ViT (under ``torch.device('meta')`` it allocates nothing).
    ``local_mode`` None: ``"dense"``, the official cell set (every up-conv cell of the top-225
    patches), so the official weights re-rank as the paper does."""
    size = normalize_image_size(image_size) or (VIT_PREPROCESS.size if arch != "vitb14" else (322, 322))
    if size[0] % 14 or size[1] % 14:
        raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
    cfg = _config(num_regions, VIT_LOCAL_MODE if local_mode is None else local_mode, train_blocks)
    return FoLModel(
        name or f"fol-{arch}",
        FoLViTBackbone(arch, cfg.train_blocks),
        VIT_PREPROCESS.with_size(size),
        cfg,
        attention_source="vit",
    )


def _fol_vit_factory(
    arch: str,
    weights=None,
    image_size=None,
    pretrained: bool = True,
    num_regions: int | None = None,
    local_mode: str | None = None,
    train_blocks: int | None = None,
) -> FoLModel:
    name = f"fol-{arch}"
    if weights is not None and is_placerank_checkpoint(weights):
        return apply_overrides(
            load_placerank_checkpoint(weights, expected_name=name), image_size, num_regions, local_mode
        )
    if weights is None and pretrained:
        default = OFFICIAL_FILES.get(arch, f"dinov2_{arch}_pretrain.pth")
        what = f"FoL {ARCH_LABEL[arch]} (official {default})" if arch in OFFICIAL_FILES else f"DINOv2 {arch}"
        weights = resolve_weights(default, None, what)
    if weights is None:
        return build_fol_vit(arch, image_size, num_regions, local_mode, train_blocks)
    weights = resolve_weights("", weights, "FoL")
    obj = read_weights(weights)
    if is_official_layout(obj):
        with torch.device("meta"):
            model = build_fol_vit(arch, image_size, num_regions, local_mode, train_blocks)
        load_official_fol(model, weights, obj=obj)
        model.weights_source = f"{Path(weights).name} (official FoL) sha256:{file_sha256(weights)[:12]}"
        return model
    model = build_fol_vit(arch, image_size, num_regions, local_mode, train_blocks)
    model.backbone.model.load_meta_checkpoint(weights)  # Meta DINOv2 pretrain: backbone only
    model.backbone.set_trainable()
    model.weights_source = (
        f"{Path(weights).name} (DINOv2 backbone; FoL heads random) sha256:{file_sha256(weights)[:12]}"
    )
    model.invalidate_weights_id()
    return model


def build_fol_cnn(
    variant: str = "tf_efficientnet_lite0",
    weights=None,
    pretrained: bool = True,
    image_size=None,
    num_regions: int | None = None,
    local_mode: str | None = None,
    train_blocks: int | None = None,
    name: str = "fol-effnet-lite0",
) -> FoLModel:
    cfg = _config(num_regions, local_mode, train_blocks)
    bb = FoLCNNBackbone(variant, weights, pretrained, cfg.train_blocks)
    model = FoLModel(
        name, bb, CNN_PREPROCESS.with_size(normalize_image_size(image_size)), cfg, attention_source="learned"
    )
    model.weights_source = bb.source
    return model


@register_model(
    "fol-effnet-lite0",
    "FoL on EfficientNet-Lite0 (ImageNet) stride-16 map: 8448-d global + top-225 region local features "
    "(learned dustbin in place of CLS attention); train with `placerank train --method fol`",
)
def fol_effnet_lite0(
    weights=None,
    image_size=None,
    pretrained: bool = True,
    num_regions: int | None = None,
    local_mode: str | None = None,
    train_blocks: int | None = None,
) -> FoLModel:
    return _fol_cnn("lite0", weights, image_size, pretrained, num_regions, local_mode, train_blocks)


def _fol_cnn(lite: str, weights, image_size, pretrained, num_regions, local_mode, train_blocks) -> FoLModel:
    """``fol-effnet-<lite>``: a placerank checkpoint of that model, or a fresh build on its backbone."""
    name = f"fol-effnet-{lite}"
    if weights is not None and is_placerank_checkpoint(weights):
        model = load_placerank_checkpoint(weights, expected_name=name)
        return apply_overrides(model, image_size, num_regions, local_mode)
    return build_fol_cnn(
        effnet_variant(lite), weights, pretrained, image_size, num_regions, local_mode, train_blocks, name=name
    )


# Larger Lites (issue 16 item 6): the same design cut at the same stride-16 stage (timm
# ``blocks.4``: 112 ch on Lite1, 120 ch on Lite2), the same last-4-blocks training rule, 8448-d.
for _lite in EFFNET_LITES[1:]:

    def _cnn_factory(
        weights=None,
        image_size=None,
        pretrained: bool = True,
        num_regions: int | None = None,
        local_mode: str | None = None,
        train_blocks: int | None = None,
        _lite=_lite,
    ) -> FoLModel:
        return _fol_cnn(_lite, weights, image_size, pretrained, num_regions, local_mode, train_blocks)

    register_model(
        f"fol-effnet-{_lite}",
        f"FoL on EfficientNet-{_lite.capitalize()} (ImageNet) stride-16 map "
        f"({EFFNET_STAGE_CHANNELS[effnet_variant(_lite)][16]} ch): 8448-d global + top-225 region local features; "
        "train with `placerank train --method fol --backbone effnet-" + _lite + "`",
    )(_cnn_factory)


for _arch, _desc in (
    (
        "vitl14",
        "FoL DINOv2 ViT-L/14 @504, 8448-d + top-225 region local features (official FoL_large.pth via --weights)",
    ),
    (
        "vitb14",
        "FoL DINOv2 ViT-B/14 @322, 8448-d + top-225 region local features (official FoL_base.pth via --weights)",
    ),
    (
        "vits14",
        "FoL DINOv2 ViT-S/14 @504 (no official weights; DINOv2 dinov2_vits14_pretrain.pth backbone via --weights)",
    ),
):

    def _factory(
        weights=None,
        image_size=None,
        pretrained: bool = True,
        num_regions: int | None = None,
        local_mode: str | None = None,
        train_blocks: int | None = None,
        _arch=_arch,
    ) -> FoLModel:
        return _fol_vit_factory(_arch, weights, image_size, pretrained, num_regions, local_mode, train_blocks)

    register_model(f"fol-{_arch}", _desc, trainable_here=False)(_factory)
