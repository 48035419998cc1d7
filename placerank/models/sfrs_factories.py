"""Registry entries ``sfrs-vgg16`` and ``sfrs-effnet-lite{0,1,2}`` (see :mod:`placerank.models.sfrs`)."""

from __future__ import annotations

from pathlib import Path

from placerank.data.images import normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import EFFNET_LITES, EFFNET_STAGE_CHANNELS, effnet_variant
from placerank.models.checkpoints import (
    is_placerank_checkpoint,
    is_placerank_payload,
    load_placerank_checkpoint,
    read_weights,
    strict_load,
)
from placerank.models.registry import register_model
from placerank.models.sfrs import SFRSModel, VGG16Conv5, build_sfrs_effnet, build_sfrs_vgg16, check_even_map
from placerank.models.sfrs_checkpoints import detect_vgg16_layout, load_openibl_hub, load_openibl_training_checkpoint
from placerank.utils import file_sha256


def _load_placerank(weights, name: str, image_size, obj=None) -> SFRSModel:
    """A trained placerank checkpoint; ``image_size`` overrides the trained input size."""
    model = load_placerank_checkpoint(weights, expected_name=name, obj=obj)
    size = normalize_image_size(image_size)
    if size:
        check_even_map(size)
        model.preprocess = model.preprocess.with_size(size)
    return model


VGG16_WEIGHTS_HELP = (
    "sfrs-vgg16 needs --weights: OpenIBL's vgg16_netvlad.pth, an OpenIBL training checkpoint "
    "(+ pca_params_*.h5 beside it), the MatConvNet VGG16 state_dict vd16_offtheshelf_conv5_3_max.pth "
    "('0.weight'..'28.bias') or a placerank sfrs checkpoint"
)


@register_model(
    "sfrs-vgg16",
    "SFRS: VGG16 conv5_3 + NetVLAD(64) + PCA-whitening 4096-d, MatConvNet input 480x640 "
    "(weights: OpenIBL vgg16_netvlad.pth / training checkpoint + PCA h5 / MatConvNet VGG16 via --weights)",
)
def sfrs_vgg16(
    weights=None,
    image_size=None,
    pretrained: bool = True,
    pca_dim: int | None = None,
    num_clusters: int = 64,
    pca: str | None = None,
    whiten: bool = True,
) -> SFRSModel:
    if not pretrained:  # architecture only (placerank checkpoint reload)
        return build_sfrs_vgg16(pca_dim=pca_dim or None, image_size=image_size, num_clusters=num_clusters)
    if weights is None:
        raise WeightsError(VGG16_WEIGHTS_HELP)
    path = Path(weights).expanduser()
    obj = read_weights(path)  # read once; every loader below takes the content
    if is_placerank_payload(obj):
        return _load_placerank(path, "sfrs-vgg16", image_size, obj=obj)
    inner = obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj
    layout = detect_vgg16_layout(inner) if isinstance(inner, dict) else "unknown"
    if layout == "hub":
        return load_openibl_hub(path, image_size=image_size, obj=obj)
    if layout == "training":
        return load_openibl_training_checkpoint(path, pca=pca, whiten=whiten, image_size=image_size, obj=obj)
    if layout == "matconvnet":
        model = build_sfrs_vgg16(image_size=image_size, num_clusters=num_clusters)
        assert isinstance(model.backbone, VGG16Conv5)
        strict_load(model.backbone.base, inner, path, "a MatConvNet VGG16 state_dict ('0.weight'..'28.bias')")
        model.weights_source = f"{path.name} (MatConvNet VGG16) sha256:{file_sha256(path)[:12]}"
        return model
    raise WeightsError(f"{path}: unrecognised weights for sfrs-vgg16 ({VGG16_WEIGHTS_HELP.split(': ', 1)[1]})")


@register_model(
    "sfrs-effnet-lite0",
    "SFRS on EfficientNet-Lite0 (ImageNet): stride-16 stage (112 ch) + NetVLAD(64) "
    "7168-d (+ PCA after training), input 352x640; trains here",
)
def sfrs_effnet_lite0(
    weights=None, image_size=None, pretrained: bool = True, pca_dim: int | None = None, num_clusters: int = 64
) -> SFRSModel:
    if weights is not None and is_placerank_checkpoint(weights):
        return _load_placerank(weights, "sfrs-effnet-lite0", image_size)
    return build_sfrs_effnet(
        weights=weights,
        pretrained=pretrained,
        pca_dim=pca_dim or None,
        image_size=image_size,
        num_clusters=num_clusters,
    )


# Larger Lites (issue 16 item 6): the same stride-16 cut (timm ``blocks.4``, the trained stage:
# Lite1 4 blocks / 112 ch, Lite2 4 blocks / 120 ch -> NetVLAD 7168-d / 7680-d), same input size.
for _lite in EFFNET_LITES[1:]:
    _c16 = EFFNET_STAGE_CHANNELS[effnet_variant(_lite)][16]

    def _sfrs_lite(
        weights=None,
        image_size=None,
        pretrained: bool = True,
        pca_dim: int | None = None,
        num_clusters: int = 64,
        _lite=_lite,
    ) -> SFRSModel:
        name = f"sfrs-effnet-{_lite}"
        if weights is not None and is_placerank_checkpoint(weights):
            return _load_placerank(weights, name, image_size)
        return build_sfrs_effnet(
            effnet_variant(_lite),
            name,
            weights=weights,
            pretrained=pretrained,
            pca_dim=pca_dim or None,
            image_size=image_size,
            num_clusters=num_clusters,
        )

    register_model(
        f"sfrs-effnet-{_lite}",
        f"SFRS on EfficientNet-{_lite.capitalize()} (ImageNet): stride-16 stage ({_c16} ch) + NetVLAD(64) "
        f"{64 * _c16}-d (+ PCA after training), input 352x640; trains here",
    )(_sfrs_lite)
