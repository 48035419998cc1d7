"""SelaVPR (ICLR 2024): a frozen backbone with small trainable adapters, GeM on L2-normalised
features for the global descriptor, and an up-convolution head for dense local features.

Spec: ``shared/docs/methods/selavpr.md``. Two backbones, one method:

- **DINOv2 ViT** (``selavpr-vit{s,b,l}14``), the paper's model. Each transformer block gets a
  serial adapter right after attention (with its own skip) and a parallel adapter beside the
  MLP (scaled by 0.2, fed the same LN2 output); both sit *inside* the block's LayerScale.
  Adapters are bottleneck MLPs (ratio 0.5) whose output layer ``D_fc2`` starts at zero, so the
  adapted network is exactly DINOv2 at step 0. Parameter names match the released checkpoints
  (``backbone.blocks.N.adapter1.D_fc1.weight`` ...), which :func:`load_official_selavpr`
  loads strictly.
- **EfficientNet-Lite0** (``selavpr-effnet-lite0``), what trains on a CPU here. The CNN
  counterpart of the global adapters: a parallel bottleneck of 1x1 convolutions beside every
  block of the last stages (and beside ``conv_head``), scaled by 0.2, output conv zero-initialised
  — again the adapted network starts exactly at the ImageNet backbone.

Both give a (B, C, h, w) map; the global descriptor is GeM over the L2-normalised map (then L2),
and ``LocalAdapt`` (two stride-2 transposed convs, C -> 256 -> 128) gives a (4h-3) x (4w-3) grid
of L2-normalised 128-d local features used by the ``selavpr-mnn`` re-ranker.

Modules: :mod:`~placerank.models.selavpr_backbones` (adapters), this one (the model),
:mod:`~placerank.models.selavpr_checkpoints` (released files) and
:mod:`~placerank.models.selavpr_factories` (registry entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.base import LocalFeatures, VPRModel
from placerank.models.gem import GeM
from placerank.models.local_head import UpConvLocalHead, grid_positions
from placerank.models.selavpr_backbones import SelaViTBackbone
from placerank.options import parse_options

# timm's tf_ EfficientNets expect inputs in [-1, 1]; 360x640 keeps the 16:9 street-view aspect
# and gives a 12x20 stride-32 map, i.e. a 45x77 grid (3,465 features, close to SelaVPR's 3,721).
EFFNET_PREPROCESS = Preprocess(size=(360, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
VIT_PREPROCESS = Preprocess(size=(224, 224))


def is_trainable_name(name: str) -> bool:
    """SelaVPR's freezing rule: inside the backbone only adapters train; everything outside it
    (GeM ``p``, the up-convolutions) trains."""
    return "adapter" in name or not name.startswith("backbone.")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelaVPRLocalOptions:
    """``local_options`` of :meth:`SelaVPRModel.encode`: the dense head has none."""


class SelaVPRModel(VPRModel):
    """Adapted backbone + GeM (L2 before pool) + ``LocalAdapt`` up-convolution head.

    ``forward`` gives the global descriptor (as every :class:`VPRModel`); :meth:`forward_train`
    gives global and dense local features from one backbone pass; :meth:`local_features`
    gives per-image :class:`LocalFeatures` with keypoints in original-image pixels.
    """

    local_dim = 128
    has_local_head = True
    aggregator: GeM
    LocalAdapt: UpConvLocalHead
    official_sanity: dict[str, Any]

    def __init__(self, name: str, backbone: Any, preprocess: Preprocess):
        super().__init__(name, backbone, GeM(p=3.0, eps=1e-6, normalize_input=True), preprocess, backbone.out_channels)
        self.LocalAdapt = UpConvLocalHead(backbone.out_channels, 256, self.local_dim, names=("upconv1", "upconv2"))
        self.freeze_backbone()

    # -- training helpers ---------------------------------------------------------------------
    def freeze_backbone(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable_name(name))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if is_trainable_name(n)]

    def forward_train(self, images: torch.Tensor, from_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (B, D) L2-normalised, dense (B, 128, gh, gw) L2-normalised per cell).

        ``from_prefix``: ``images`` are ``backbone.forward_prefix`` outputs (cached frozen stages).
        """
        out = self.backbone.forward_from_prefix(images) if from_prefix else self.backbone(images)
        fmap = out.feature_map
        g = F.normalize(self.aggregator(fmap).float(), dim=-1)
        return g, self.LocalAdapt(fmap)

    def global_from_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_from_prefix(prefix).feature_map
        return F.normalize(self.aggregator(fmap).float(), dim=-1)

    # -- local features -----------------------------------------------------------------------
    def grid_size(self, input_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """Dense grid (rows, cols) for an input of ``input_size`` (default: the preprocess size)."""
        h, w = input_size or self.preprocess.size
        s = self.backbone.stride
        fh, fw = (h // s, w // s) if s == 14 else (-(-h // s), -(-w // s))
        return 4 * fh - 3, 4 * fw - 3

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        local_options: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[LocalFeatures] | None]:
        """Global descriptors and (when ``local_options`` is given; SelaVPR's head has no
        options, so it must be empty) the dense local features, from ONE backbone pass."""
        out = self.backbone(images)
        g = F.normalize(self.aggregator(out).float(), dim=-1)  # exactly VPRModel.forward
        if local_options is None:
            return g, None
        parse_options(SelaVPRLocalOptions, local_options, what="SelaVPR local option")
        in_hw = (int(images.shape[-2]), int(images.shape[-1]))
        sizes = list(original_sizes) if original_sizes is not None else [in_hw] * images.shape[0]
        return g, self._dense_local(self.LocalAdapt(out.feature_map), in_hw, sizes)

    def _dense_local(
        self, dense: torch.Tensor, in_hw: tuple[int, int], original_sizes: Sequence[tuple[int, int]]
    ) -> list[LocalFeatures]:
        """(B, 128, gh, gw) dense features -> per image :class:`LocalFeatures`; keypoints are the
        grid cells' centres in each original image (``grid_positions``), clipped to the image."""
        B, C, gh, gw = dense.shape
        desc = dense.permute(0, 2, 3, 1).reshape(B, gh * gw, C).float().cpu().numpy()
        out = []
        for b in range(B):
            size = (int(original_sizes[b][0]), int(original_sizes[b][1]))
            kp = grid_positions(gh, gw, float(self.backbone.stride), size, in_hw).numpy()
            # With TF-"same" padding a 360 px input gives 12 stride-32 rows, the last centred
            # past the bottom edge; keep every keypoint inside the image it describes.
            kp[:, 0] = kp[:, 0].clip(0, size[1] - 1)
            kp[:, 1] = kp[:, 1].clip(0, size[0] - 1)
            out.append(LocalFeatures(keypoints=kp.astype(np.float32), descriptors=desc[b], image_size=size))
        return out

    def local_features(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        """Dense local features of a preprocessed batch (:meth:`encode`'s local half)."""
        _, local = self.encode(images, original_sizes, {})
        assert local is not None
        return local

    def describe(self) -> dict:
        d = super().describe()
        gh, gw = self.grid_size()
        d.update(
            local_dim=self.local_dim,
            local_grid=[gh, gw],
            trainable_params=sum(p.numel() for p in self.trainable_parameters()),
        )
        return d


def _build_vit(name: str, arch: str, image_size, num_register_tokens: int = 0) -> SelaVPRModel:
    size = normalize_image_size(image_size) or VIT_PREPROCESS.size
    if size[0] % 14 or size[1] % 14:
        raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
    bb = SelaViTBackbone(arch, num_register_tokens=num_register_tokens)
    return SelaVPRModel(name, bb, VIT_PREPROCESS.with_size(size))
