"""SelaVPR's adapted backbones (spec ``shared/docs/methods/selavpr.md``): DINOv2 ViT blocks with a
serial and a parallel bottleneck adapter, and EfficientNet-Lite with parallel 1x1-conv adapters
beside its last stages; both start exactly at the pretrained network (zero-initialised outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from placerank.errors import WeightsError
from placerank.models.backbones import DinoV2Backbone, EfficientNetBackbone
from placerank.models.base import BackboneOutput
from placerank.models.checkpoints import check_state, read_state_dict

ADAPTER_RATIO = 0.5  # bottleneck width / block width (every official instantiation passes 0.5)
PARALLEL_SCALE = 0.2  # constant factor on the parallel adapter's output
EFFNET_VARIANT = "tf_efficientnet_lite0"

# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """Bottleneck MLP ``D_fc2(ReLU(D_fc1(h)))``, plus ``h`` when ``skip`` (the serial adapter).

    ``D_fc1``: truncated normal (std 0.02), bias 0; ``D_fc2``: all zeros, so a serial adapter
    starts as the identity and a parallel one as zero.
    """

    def __init__(self, dim: int, ratio: float = ADAPTER_RATIO, skip: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Linear(hidden, dim)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.D_fc2(self.act(self.D_fc1(h)))
        return h + y if self.skip else y


def _adapted_block_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    # x'  = x  + ls1(A1(Attn(LN1(x))))                   serial adapter, inside LayerScale
    # x'' = x' + ls2(MLP(LN2(x')) + 0.2 * A2(LN2(x')))   parallel adapter beside the MLP
    kw = {}
    if attn_mask is not None or is_causal:
        kw = dict(attn_mask=attn_mask, is_causal=is_causal)
    x = x + self.drop_path1(self.ls1(self.adapter1(self.attn(self.norm1(x), **kw))))
    h = self.norm2(x)
    return x + self.drop_path2(self.ls2(self.mlp(h) + self.adapter_scale * self.adapter2(h)))


class SelaViTBlock(nn.Module):
    """Marker base for a timm ViT ``Block`` with SelaVPR's two adapters (see :func:`adapt_vit_block`)."""


_ADAPTED_CLASSES: dict[type, type] = {}


def adapt_vit_block(block: Any, dim: int, ratio: float = ADAPTER_RATIO, scale: float = PARALLEL_SCALE) -> nn.Module:
    """Add ``adapter1``/``adapter2`` to an already-built timm ``Block`` in place.

    The block keeps its own class and parameter names (``norm1``, ``attn.qkv``, ``ls1.gamma``...,
    i.e. Meta's and the SelaVPR checkpoints' names); only its forward changes, through a
    per-instance subclass. Building the adapters around existing blocks avoids constructing a
    second 300 M-parameter ViT-L.
    """
    block.adapter1 = Adapter(dim, ratio, skip=True)
    block.adapter2 = Adapter(dim, ratio, skip=False)
    block.adapter_scale = float(scale)
    cls = type(block)
    if not issubclass(cls, SelaViTBlock):
        if cls not in _ADAPTED_CLASSES:
            _ADAPTED_CLASSES[cls] = type(
                f"SelaVPR{cls.__name__}", (cls, SelaViTBlock), {"forward": _adapted_block_forward}
            )
        block.__class__ = _ADAPTED_CLASSES[cls]
    return block


class SelaViTBackbone(DinoV2Backbone):
    """DINOv2 ViT (Meta's parameter names) with SelaVPR adapters in every block."""

    def __init__(
        self,
        arch: str = "vitl14",
        num_register_tokens: int = 0,
        ratio: float = ADAPTER_RATIO,
        scale: float = PARALLEL_SCALE,
    ):
        super().__init__(arch, num_register_tokens=num_register_tokens, interpolate_offset=0.1)
        for blk in self.blocks:
            adapt_vit_block(blk, self.embed_dim, ratio, scale)

    # Every block has adapters, so nothing but the input can be cached.
    frozen_prefix = False

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_from_prefix(self, x: torch.Tensor) -> BackboneOutput:
        return self.forward(x)

    def load_meta_checkpoint(self, path: str | Path | dict, state: dict | None = None) -> None:
        """Strict load of Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` (or its already-read
        ``state``, or a state dict given as ``path``) into the frozen part; the adapters keep
        their (zero-output) initialisation."""
        if isinstance(path, dict):
            where, state = "state dict", path
        else:
            where = str(path)
        sd = read_state_dict(where) if state is None else state
        own = self.state_dict()
        check_state({k: tuple(v.shape) for k, v in own.items() if "adapter" not in k}, sd, where, f"DINOv2 {self.arch}")
        self.load_state_dict({**own, **sd}, strict=True)


class ConvAdapter(nn.Module):
    """CNN counterpart of the parallel adapter: ``D_fc2(ReLU(D_fc1(x)))`` with 1x1 convs.

    ``D_fc1`` (c_in -> ratio * c_out, stride of the block it sits beside, so shapes match the
    block output; a 1x1 stride-2 conv gives ceil(H/2) like TF-"same" padding) is initialised like
    the ViT adapter; ``D_fc2`` is all zeros so the adapter starts as zero.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, ratio: float = ADAPTER_RATIO):
        super().__init__()
        hidden = max(8, int(round(c_out * ratio)))
        self.D_fc1 = nn.Conv2d(c_in, hidden, 1, stride=stride)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Conv2d(hidden, c_out, 1)
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)  # type: ignore[arg-type]  # a conv built with bias
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)  # type: ignore[arg-type]  # a conv built with bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D_fc2(self.act(self.D_fc1(x)))


def _block_io(block: Any) -> tuple[int, int, int]:
    """(in channels, out channels, stride) of a timm EfficientNet block."""
    if hasattr(block, "conv_pw"):  # InvertedResidual
        c_in, c_out = block.conv_pw.in_channels, block.conv_pwl.out_channels
    else:  # DepthwiseSeparableConv
        c_in, c_out = block.conv_dw.in_channels, block.conv_pw.out_channels
    return c_in, c_out, int(block.conv_dw.stride[0])


class SelaEffNetBackbone(nn.Module):
    """Frozen EfficientNet-Lite with parallel conv adapters beside the blocks of
    ``adapt_stages`` and (``adapt_head``) beside ``conv_head``+``bn2``:
    ``y = block(x) + 0.2 * adapter(x)``.

    Default: the two stride-32 stages (5: 4 blocks, 6: 1 block) plus the head, i.e. the last
    stages, where a CPU can afford the backward pass (adding the stride-16 stage 4 made a
    training step several times slower here for no measured gain).

    The frozen network's BatchNorms always run in eval mode (their ImageNet statistics are
    part of the frozen backbone; batches of 16 street images would corrupt them).
    """

    net: Any  # the timm EfficientNet of the base backbone

    def __init__(
        self,
        variant: str = EFFNET_VARIANT,
        adapt_stages: Sequence[int] = (5, 6),
        adapt_head: bool = True,
        ratio: float = ADAPTER_RATIO,
        scale: float = PARALLEL_SCALE,
        base: EfficientNetBackbone | None = None,
    ):
        super().__init__()
        self.net = (base or EfficientNetBackbone(variant)).net
        self.variant = variant
        self.out_channels = self.net.num_features
        self.stride = 32
        self.scale = float(scale)
        self.adapt_stages = tuple(int(s) for s in adapt_stages)
        n_stages = len(self.net.blocks)
        if any(s < 0 or s >= n_stages for s in self.adapt_stages):
            raise WeightsError(f"adapt_stages must be in 0..{n_stages - 1}, got {list(self.adapt_stages)}")
        self.adapters = nn.ModuleDict()
        for s in self.adapt_stages:
            for j, blk in enumerate(self.net.blocks[s]):
                c_in, c_out, stride = _block_io(blk)
                self.adapters[f"{s}_{j}"] = ConvAdapter(c_in, c_out, stride, ratio)
        self.first_adapted = min(self.adapt_stages) if self.adapt_stages else n_stages
        self.adapt_head = bool(adapt_head)
        if adapt_head:
            self.adapters["head"] = ConvAdapter(self.net.conv_head.in_channels, self.out_channels, 1, ratio)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    # The stages before the first adapter are frozen and see no adapter output, so their result
    # per image never changes during training: the trainer caches it (``frozen_prefix``).
    frozen_prefix = True

    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the stages before the first adapted one (no trainable parameter inside)."""
        n = self.net
        x = n.bn1(n.conv_stem(x))
        for s in range(self.first_adapted):
            x = n.blocks[s](x)
        return x

    def forward_from_prefix(self, x: torch.Tensor) -> BackboneOutput:
        n = self.net
        for s in range(self.first_adapted, len(n.blocks)):
            for j, blk in enumerate(n.blocks[s]):
                key = f"{s}_{j}"
                y = blk(x)
                if key in self.adapters:
                    y = y + self.scale * self.adapters[key](x)
                x = y
        y = n.bn2(n.conv_head(x))
        if self.adapt_head:
            y = y + self.scale * self.adapters["head"](x)
        return BackboneOutput(y)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return self.forward_from_prefix(self.forward_prefix(x))
