"""FoL backbones (spec §2.3): a frozen trunk run without autograd and trainable last blocks.

- :class:`FoLViTBackbone`: DINOv2 as ``backbone.model`` (official key prefix), with the last
  block's CLS-to-patch attention.
- :class:`FoLCNNBackbone`: EfficientNet-Lite cut at its stride-16 stage (the CPU counterpart).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from placerank.errors import WeightsError
from placerank.models.backbones import DinoV2Backbone
from placerank.models.base import BackboneOutput
from placerank.models.zoo import effnet_backbone

# ---------------------------------------------------------------------------------------------
# Backbones with a frozen trunk and trainable last blocks
# ---------------------------------------------------------------------------------------------


class FoLViTBackbone(nn.Module):
    """DINOv2 as ``backbone.model`` (official key prefix ``backbone.model.``).

    Frozen trunk under ``no_grad`` and detached (§2.3); the last ``train_blocks`` blocks and the
    final LayerNorm train. The CLS-to-patch attention is read from the tokens entering the last
    block (summed over heads, range [0, heads]) with gradient, then the block runs normally.
    """

    def __init__(self, arch: str, train_blocks: int = 4):
        super().__init__()
        self.model = DinoV2Backbone(arch)
        self.arch = arch
        self.out_channels = self.model.out_channels
        self.stride = self.model.stride
        self.train_blocks = int(train_blocks)
        depth = len(self.model.blocks)
        if not 1 <= self.train_blocks <= depth:
            raise WeightsError(f"train_blocks must be in 1..{depth} for DINOv2 {arch}, got {train_blocks}")
        self.set_trainable()

    def set_trainable(self) -> None:
        n_frozen = len(self.model.blocks) - self.train_blocks
        for name, p in self.model.named_parameters():
            trainable = name.startswith("norm.") or (name.startswith("blocks.") and int(name.split(".")[1]) >= n_frozen)
            p.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        m = self.model
        n_frozen = len(m.blocks) - self.train_blocks
        with torch.no_grad():
            tokens, h, w = m.prepare_tokens(x)
            for blk in m.blocks[:n_frozen]:
                tokens = blk(tokens)
        tokens = tokens.detach()
        prefix = 1 + m.num_register_tokens
        attention = None
        for i in range(n_frozen, len(m.blocks)):
            if i == len(m.blocks) - 1:
                attention = m.cls_attention(m.blocks[i], tokens, prefix)
            tokens = m.blocks[i](tokens)
        tokens = m.norm(tokens)
        patches = tokens[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return BackboneOutput(patches, cls_token=tokens[:, 0], attention=attention)


class FoLCNNBackbone(nn.Module):
    """EfficientNet-Lite cut at its stride-16 stage (``blocks.4``, 112 ch for Lite0).

    The unused tail (stride-32 stages, ``conv_head``) is removed after the strict ImageNet load,
    so it is neither stored nor hashed. The stem and all but the last ``train_blocks``
    inverted-residual blocks are frozen (run under ``no_grad``). BatchNorm statistics stay
    frozen in training (P x K batches are small and place-correlated).
    """

    cnn: Any  # the cut EfficientNetBackbone

    def __init__(
        self, variant: str = "tf_efficientnet_lite0", weights=None, pretrained: bool = True, train_blocks: int = 4
    ):
        super().__init__()
        cnn, self.source = effnet_backbone(variant, weights, pretrained, out_index=3)
        last = cnn._last_block
        cnn.net.blocks = nn.Sequential(*list(cnn.net.blocks)[: last + 1])
        cnn.net.conv_head = nn.Identity()
        cnn.net.bn2 = nn.Identity()
        # channels_last: CPU depthwise-conv backward is 10-40x faster in NHWC (measured 2.8-12 s ->
        # 0.3 s for one 5x5 depthwise layer on 8 x 672 x 23 x 40); harmless on GPU.
        self.cnn = cnn.to(memory_format=torch.channels_last)
        self.variant = variant
        self.out_channels = cnn.out_channels
        self.stride = cnn.stride
        self.train_blocks = int(train_blocks)
        self._units = [nn.Sequential(cnn.net.conv_stem, cnn.net.bn1)] + [b for stage in cnn.net.blocks for b in stage]
        if not 1 <= self.train_blocks < len(self._units):
            raise WeightsError(f"train_blocks must be in 1..{len(self._units) - 1} for {variant}, got {train_blocks}")
        self.set_trainable()

    def set_trainable(self) -> None:
        n_frozen = len(self._units) - self.train_blocks
        for i, unit in enumerate(self._units):
            for p in unit.parameters():
                p.requires_grad_(i >= n_frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        n_frozen = len(self._units) - self.train_blocks
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for unit in self._units[:n_frozen]:
                x = unit(x)
        x = x.detach()
        for unit in self._units[n_frozen:]:
            x = unit(x)
        return BackboneOutput(x)
