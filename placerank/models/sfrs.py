"""SFRS (Ge et al., ECCV 2020): a CNN cut at a stride-16 map + NetVLAD(64) + PCA-whitening.

Two registry entries:

- ``sfrs-vgg16``: the paper's model. VGG16 ``features[:-2]`` (conv5_3 *before* ReLU, 512 ch,
  stride 16; only conv5_x trainable), NetVLAD(64, 512) bias-free, PCA-whitening to 4096-d, and
  MatConvNet preprocessing (480 x 640, mean (0.4850, 0.4580, 0.4076), std 1/255 — i.e. 0..255
  pixels minus the VGG means; the ImageNet std would silently destroy accuracy). No VGG16
  weights ship here, so ``--weights`` is required and may be:
    * OpenIBL's torch.hub file ``vgg16_netvlad.pth`` (30 tensors, PCA included);
    * an OpenIBL training checkpoint (``model_best.pth.tar``, ``module.``-prefixed, optional
      ``state_dict`` wrapper) plus its PCA ``pca_params_<name>.h5`` found beside it or given as
      ``pca=PATH`` (without one the model gives the 32,768-d VLAD);
    * the MatConvNet VGG16 state_dict ``vd16_offtheshelf_conv5_3_max.pth`` ('0.weight'..'28.bias',
      initialisation only: NetVLAD is then k-means-initialised from data on first use);
    * a placerank checkpoint written by ``placerank train --method sfrs``.
  Every loader is strict: exact key set and shapes, or a one-line :class:`WeightsError`.
- ``sfrs-effnet-lite0``: the same method on EfficientNet-Lite0 (ImageNet weights shipped here),
  cut after its stride-16 stage (``blocks.4``, 112 ch; only that stage trainable). Default input
  352 x 640 gives a 22 x 40 map (even, as the quarters need).

Modules: this one (backbones, model, builders), :mod:`~placerank.models.sfrs_checkpoints`
(OpenIBL files), :mod:`~placerank.models.sfrs_factories` (registry entries),
:mod:`~placerank.models.sfrs_regions` (the 9 region descriptors).

Inference order: backbone -> per-location L2 -> soft-assign -> residual sums -> intra-L2 ->
cluster-major flatten -> L2 -> (PCA-whitening -> L2). Training uses the pre-PCA vector.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.base import BackboneOutput, VPRModel
from placerank.models.netvlad import NetVLAD
from placerank.models.pca import PCAParams, PCAWhitening
from placerank.models.sfrs_regions import quarter_masks, regions_from_quarters

SFRS_VGG16_PREPROCESS = Preprocess(
    size=(480, 640), mean=(0.48501961, 0.45795686, 0.40760392), std=(1 / 255, 1 / 255, 1 / 255)
)
# timm's tf_ EfficientNets expect [-1, 1] inputs; 352 x 640 -> a 22 x 40 stride-16 map.
SFRS_EFFNET_PREPROCESS = Preprocess(size=(352, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_TRAINABLE_FROM = 24  # conv5_1: modules with index < 24 are frozen ("train_layers=conv5")
VLAD_DIM_VGG16 = 64 * 512
PCA_DIM_VGG16 = 4096

# ---------------------------------------------------------------------------------------------
# Backbones split into a frozen stem and a trainable last stage
# ---------------------------------------------------------------------------------------------


class SFRSBackbone(nn.Module):
    """A CNN cut at a stride-16 map, split so training can run (and cache) the frozen part
    separately: ``forward(x) == trainable_features(frozen_features(x))``.

    The backbone always runs in eval mode: VGG has no batch norm, and EfficientNet's batch norm
    keeps its ImageNet statistics (a tuple of ~20 images from one place is no batch to estimate
    them from). Only :meth:`trainable_parameters` get gradients.
    """

    stride = 16
    out_channels: int

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_features(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return BackboneOutput(self.trainable_features(self.frozen_features(x)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters()]

    def set_trainable(self) -> None:
        """requires_grad only for the last stage."""
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True):
        return super().train(False)


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` (the exact module list ``vgg16(weights=None).features``
    builds, without allocating the 120M-parameter classifier)."""
    from torchvision.models import vgg

    return vgg.make_layers(vgg.cfgs["D"], batch_norm=False)


class VGG16Conv5(SFRSBackbone):
    """VGG16 ``features[:-2]``: 29 modules, ends at conv5_3 before its ReLU (512 ch, stride 16)."""

    out_channels = 512

    def __init__(self):
        super().__init__()
        self.base = nn.Sequential(*list(_vgg16_features().children())[:-2])
        assert len(self.base) == 29

    def frozen_features(self, x):
        return self.base[:VGG16_TRAINABLE_FROM](x)

    def trainable_features(self, y):
        return self.base[VGG16_TRAINABLE_FROM:](y)

    def trainable_modules(self):
        return list(self.base[VGG16_TRAINABLE_FROM:])


class EffNetStride16(SFRSBackbone):
    """EfficientNet-Lite cut after its stride-16 stage (timm ``blocks.4``); that stage trains."""

    def __init__(self, variant: str = "tf_efficientnet_lite0", weights=None, pretrained: bool = True):
        super().__init__()
        from placerank.models.zoo import effnet_backbone

        body, self.source = effnet_backbone(variant, weights, pretrained, out_index=3)
        last = body._last_block
        net = body.net
        net.blocks = net.blocks[: last + 1]  # drop the stride-32 stages and the head: never used
        net.conv_head = nn.Identity()
        net.bn2 = nn.Identity()
        self.body = body
        self.last = last
        self.out_channels = body.out_channels

    def frozen_features(self, x):
        n = self.body.net
        x = n.bn1(n.conv_stem(x))
        for block in n.blocks[: self.last]:
            x = block(x)
        return x

    def trainable_features(self, y):
        return self.body.net.blocks[self.last](y)

    def trainable_modules(self):
        return [self.body.net.blocks[self.last]]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class SFRSModel(VPRModel):
    backbone: SFRSBackbone
    aggregator: NetVLAD
    pca: PCAWhitening | None

    """Backbone + NetVLAD + optional PCA-whitening; also gives the 9 SFRS region descriptors.

    ``model_kwargs`` are the registry options that rebuild this exact architecture (written into
    placerank checkpoints: ``pca_dim`` decides whether a PCA layer exists and its size).
    """

    def __init__(
        self,
        name: str,
        backbone: SFRSBackbone,
        vlad: NetVLAD,
        preprocess: Preprocess,
        pca_dim: int | None = None,
        model_kwargs: dict | None = None,
    ):
        super().__init__(name, backbone, vlad, preprocess, pca_dim or vlad.output_dim)
        self.pca = PCAWhitening(vlad.output_dim, pca_dim) if pca_dim else None
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs["pca_dim"] = int(pca_dim or 0)

    @property
    def vlad_dim(self) -> int:
        return self.aggregator.output_dim

    # -- inference ------------------------------------------------------------------------
    def feature_map(self, x: torch.Tensor, frozen_input: bool = False) -> torch.Tensor:
        """Backbone map from images, or from cached :meth:`SFRSBackbone.frozen_features`."""
        if frozen_input:
            return self.backbone.trainable_features(x)
        return self.backbone(x).feature_map

    def forward(self, x: torch.Tensor, output: str = "descriptor", frozen_input: bool = False) -> torch.Tensor:
        """``output``: 'descriptor' (final, PCA-whitened when the model has PCA), 'vlad' (the
        pre-PCA vector training uses) or 'regions' ((B, 9, K*D) region descriptors)."""
        fmap = self.feature_map(x, frozen_input)
        if output == "regions":
            return self.regions_from_map(fmap)
        v = self.aggregator(fmap)
        if output == "vlad" or self.pca is None:
            return v
        if output != "descriptor":
            raise ValueError(f"unknown output '{output}'")
        return F.normalize(self.pca(v), dim=-1)

    def regions_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, 9, K*D): global, top, bottom, left, right, TL, TR, BL, BR (spec §2.4); the soft
        assignment is computed once and the quarters are four masked residual sums."""
        vlad: NetVLAD = self.aggregator
        x = F.normalize(fmap, dim=1)
        a = vlad.soft_assign(x)
        masks = quarter_masks(x.shape[-2], x.shape[-1], device=x.device)
        quarters = torch.stack([vlad.residual_sums(x, a, m) for m in masks], dim=1)
        return regions_from_quarters(quarters)

    # -- PCA ------------------------------------------------------------------------------
    def set_pca(self, params: PCAParams | None, whiten: bool = True) -> None:
        """Attach (or with None remove) PCA-whitening; updates ``descriptor_dim``."""
        if params is None:
            self.pca = None
            self.descriptor_dim = self.vlad_dim
        else:
            if params.in_dim != self.vlad_dim:
                raise WeightsError(f"PCA input is {params.in_dim}-d but the model's VLAD is {self.vlad_dim}-d")
            ref = next(self.parameters())
            self.pca = PCAWhitening.from_params(params, whiten).to(ref.device)
            self.descriptor_dim = params.out_dim
        self.model_kwargs["pca_dim"] = int(self.pca.out_dim if self.pca is not None else 0)
        self.invalidate_weights_id()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.backbone.trainable_parameters() + list(self.aggregator.parameters())

    def set_trainable(self) -> None:
        self.backbone.set_trainable()
        for p in self.aggregator.parameters():
            p.requires_grad_(True)

    def describe(self) -> dict:
        d = super().describe()
        d["vlad_dim"] = self.vlad_dim
        d["pca"] = f"{self.vlad_dim} -> {self.pca.out_dim}" if self.pca is not None else None
        d["preprocess"] = self.preprocess.signature()
        return d


# ---------------------------------------------------------------------------------------------
# Builders (registry entries: :mod:`placerank.models.sfrs_factories`)
# ---------------------------------------------------------------------------------------------


def check_even_map(size: tuple[int, int], stride: int = 16) -> None:
    h, w = size
    if h % (2 * stride) or w % (2 * stride):
        raise WeightsError(
            f"SFRS input {h}x{w} gives a {h // stride}x{w // stride}-ish feature map; the region "
            f"quarters need an even map: use multiples of {2 * stride} px (e.g. 352 640)"
        )


def build_sfrs_vgg16(pca_dim: int | None = None, image_size=None, num_clusters: int = 64) -> SFRSModel:
    """Random-init ``sfrs-vgg16`` of the given shape (loaders fill it)."""
    size = normalize_image_size(image_size) or SFRS_VGG16_PREPROCESS.size
    check_even_map(size)
    kwargs: dict[str, Any] = {"num_clusters": num_clusters}
    if normalize_image_size(image_size):
        kwargs["image_size"] = list(size)
    return SFRSModel(
        "sfrs-vgg16",
        VGG16Conv5(),
        NetVLAD(num_clusters, 512),
        SFRS_VGG16_PREPROCESS.with_size(size),
        pca_dim=pca_dim,
        model_kwargs=kwargs,
    )


def build_sfrs_effnet(
    variant: str = "tf_efficientnet_lite0",
    name: str = "sfrs-effnet-lite0",
    weights=None,
    pretrained: bool = True,
    pca_dim: int | None = None,
    image_size=None,
    num_clusters: int = 64,
) -> SFRSModel:
    size = normalize_image_size(image_size) or SFRS_EFFNET_PREPROCESS.size
    check_even_map(size)
    bb = EffNetStride16(variant, weights, pretrained)
    kwargs: dict[str, Any] = {"num_clusters": num_clusters}
    if normalize_image_size(image_size):
        kwargs["image_size"] = list(size)
    model = SFRSModel(
        name,
        bb,
        NetVLAD(num_clusters, bb.out_channels),
        SFRS_EFFNET_PREPROCESS.with_size(size),
        pca_dim=pca_dim,
        model_kwargs=kwargs,
    )
    model.weights_source = bb.source
    return model
