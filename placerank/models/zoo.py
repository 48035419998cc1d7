"""Baseline models: backbone x {GeM, NetVLAD}.

- ``effnet-lite0-gem`` (the default): EfficientNet-Lite0 (ImageNet, timm layout) + GeM, 1280-d.
- ``effnet-lite0-netvlad``: EfficientNet-Lite0 cut at its last stage (320 ch) + NetVLAD(64),
  k-means-initialised from real database features on first use.
- ``effnet-lite{1,2}-{gem,netvlad}``: larger Lite variants from the PyPI weight packages (see
  :mod:`placerank.models.effnet_packages`); NetVLAD on Lite2's 352-ch last stage is 22528-d.
  The methods' Lite1/Lite2 variants (``fol-``, ``selavpr-``, ``sfrs-effnet-lite{1,2}``) use the
  same :func:`effnet_backbone` and the stage table in :mod:`placerank.models.backbones`.
- ``dinov2-vit{s,b,l}14-{gem,netvlad}``: DINOv2 ViTs (weights from a Meta ``.pth`` file given
  with ``--weights``; none ship here).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import (
    EFFNET_LITES,
    EFFNET_STAGE_CHANNELS,
    EFFNET_WEIGHT_FILES,
    DinoV2Backbone,
    EfficientNetBackbone,
    effnet_variant,
)
from placerank.models.base import VPRModel
from placerank.models.gem import GeM
from placerank.models.netvlad import NetVLAD
from placerank.models.registry import register_model
from placerank.models.weights import resolve_weights
from placerank.utils import file_sha256

# timm's tf_ EfficientNets were trained on inputs scaled to [-1, 1].
EFFNET_PREPROCESS = Preprocess(size=(360, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
DINOV2_PREPROCESS = Preprocess(size=(224, 224))


def effnet_backbone(
    variant: str, weights=None, pretrained: bool = True, out_index: int = -1
) -> tuple[EfficientNetBackbone, str]:
    """Build an EfficientNet-Lite backbone with ImageNet weights; returns (backbone, source)."""
    bb = EfficientNetBackbone(variant, out_index=out_index)
    if not pretrained:
        return bb, "random-init"
    if weights is None and variant != "tf_efficientnet_lite0":
        from placerank.models.effnet_packages import packaged_effnet_weights

        path = packaged_effnet_weights(variant)
    else:
        path = resolve_weights(
            EFFNET_WEIGHT_FILES[variant], weights, f"EfficientNet-{variant[-5:].capitalize()} ImageNet"
        )
    bb.load_imagenet(path)
    return bb, f"{Path(path).name} sha256:{file_sha256(path)[:12]}"


def _effnet_model(name, variant, aggregator_kind, weights, image_size, pretrained, num_clusters=64):
    from placerank.models.checkpoints import is_placerank_checkpoint, load_placerank_checkpoint

    if weights is not None and is_placerank_checkpoint(weights):
        return load_placerank_checkpoint(weights, expected_name=name)
    out_index = -1 if aggregator_kind == "gem" else 4
    bb, source = effnet_backbone(variant, weights, pretrained, out_index)
    agg: nn.Module
    if aggregator_kind == "gem":
        agg, dim = GeM(p=3.0), bb.out_channels
    else:
        agg = NetVLAD(num_clusters, bb.out_channels)
        dim = agg.output_dim
    model = VPRModel(name, bb, agg, EFFNET_PREPROCESS.with_size(normalize_image_size(image_size)), dim)
    model.weights_source = source
    return model


for _v in EFFNET_LITES:
    _variant = effnet_variant(_v)
    _c32 = EFFNET_STAGE_CHANNELS[_variant][32]

    def _gem(weights=None, image_size=None, pretrained=True, _variant=_variant, _n=f"effnet-{_v}-gem"):
        return _effnet_model(_n, _variant, "gem", weights, image_size, pretrained)

    def _vlad(
        weights=None, image_size=None, pretrained=True, num_clusters=64, _variant=_variant, _n=f"effnet-{_v}-netvlad"
    ):
        return _effnet_model(_n, _variant, "netvlad", weights, image_size, pretrained, num_clusters)

    register_model(f"effnet-{_v}-gem", f"EfficientNet-{_v.capitalize()} (ImageNet) + GeM, 1280-d")(_gem)
    register_model(
        f"effnet-{_v}-netvlad",
        f"EfficientNet-{_v.capitalize()} last stage ({_c32} ch) + NetVLAD(64), {64 * _c32}-d, k-means init from data",
    )(_vlad)


def _dinov2_model(name, arch, aggregator_kind, weights, image_size, pretrained, num_clusters=64):
    from placerank.models.checkpoints import is_placerank_checkpoint, load_placerank_checkpoint

    if weights is not None and is_placerank_checkpoint(weights):
        return load_placerank_checkpoint(weights, expected_name=name)
    bb = DinoV2Backbone(arch)
    source = "random-init"
    if pretrained:
        if weights is None:
            weights = resolve_weights(f"dinov2_{arch}_pretrain.pth", None, f"DINOv2 {arch}")
        bb.load_meta_checkpoint(weights)
        source = f"{Path(weights).name} sha256:{file_sha256(weights)[:12]}"
    agg: nn.Module
    if aggregator_kind == "gem":
        agg, dim = GeM(p=3.0, normalize_input=True), int(bb.out_channels)
    else:
        agg = NetVLAD(num_clusters, bb.out_channels)
        dim = agg.output_dim
    size = normalize_image_size(image_size) or DINOV2_PREPROCESS.size
    if size[0] % 14 or size[1] % 14:
        raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
    model = VPRModel(name, bb, agg, DINOV2_PREPROCESS.with_size(size), dim)
    model.weights_source = source
    return model


for _arch in ("vits14", "vitb14", "vitl14"):
    for _agg in ("gem", "netvlad"):

        def _factory(
            weights=None,
            image_size=None,
            pretrained=True,
            num_clusters=64,
            _arch=_arch,
            _agg=_agg,
            _n=f"dinov2-{_arch}-{_agg}",
        ):
            return _dinov2_model(_n, _arch, _agg, weights, image_size, pretrained, num_clusters)

        register_model(
            f"dinov2-{_arch}-{_agg}",
            f"DINOv2 {_arch} + {'GeM on L2-normalised patch tokens' if _agg == 'gem' else 'NetVLAD(64)'}"
            f" (weights: Meta dinov2_{_arch}_pretrain.pth via --weights)",
            trainable_here=False,
        )(_factory)
