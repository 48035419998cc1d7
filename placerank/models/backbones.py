"""Backbones: EfficientNet-Lite (timm) and the DINOv2 ViT family.

Both return a :class:`BackboneOutput` whose ``feature_map`` is (B, C, h, w), so aggregators,
local heads and losses are backbone-agnostic.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.errors import WeightsError
from placerank.models.base import BackboneOutput
from placerank.models.checkpoints import read_state_dict, strict_load

# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm layout)
# ---------------------------------------------------------------------------------------------

EFFNET_WEIGHT_FILES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_in1k_timm.safetensors",
    "tf_efficientnet_lite1": "efficientnet_lite1_in1k_timm.safetensors",
    "tf_efficientnet_lite2": "efficientnet_lite2_in1k_timm.safetensors",
}

# Channels of the cuts the methods use, by output stride: 16 = timm ``blocks.4`` (FoL's and SFRS's
# map), 32 = ``blocks.6`` (the NetVLAD baseline's map); ``conv_head`` is 1280 for every Lite (the
# Lite rule keeps stem and head fixed while scaling width/depth: Lite1 = Lite0 widths with deeper
# stages, Lite2 = 1.1x widths). Registry descriptions read this table, so listing models never
# builds a network; tests check it against timm's ``feature_info``.
EFFNET_LITES = ("lite0", "lite1", "lite2")
EFFNET_STAGE_CHANNELS = {
    "tf_efficientnet_lite0": {16: 112, 32: 320},
    "tf_efficientnet_lite1": {16: 112, 32: 320},
    "tf_efficientnet_lite2": {16: 120, 32: 352},
}


def effnet_variant(lite: str) -> str:
    """``"lite2"`` -> timm's ``"tf_efficientnet_lite2"``."""
    return f"tf_efficientnet_{lite}"


class EfficientNetBackbone(nn.Module):
    """timm ``tf_efficientnet_lite*`` up to ``conv_head`` (1280 channels, stride 32).

    ``out_index`` chooses a shallower cut (timm feature_info stage index 0..4) for methods that
    need a finer map; -1 (default) is the full ``forward_features`` output.
    """

    net: Any  # a timm EfficientNet (dynamic attributes: blocks, conv_stem, ...)
    stride: int
    out_channels: int
    _last_block: int

    def __init__(self, variant: str = "tf_efficientnet_lite0", out_index: int = -1):
        super().__init__()
        import timm

        self.variant = variant
        self.net = timm.create_model(variant, pretrained=False)
        self.out_index = out_index
        if out_index == -1:
            self.out_channels = self.net.num_features
            self.stride = 32
        else:
            info = self.net.feature_info[out_index]
            self.out_channels = info["num_chs"]
            self.stride = info["reduction"]
            self._last_block = int(info["module"].split(".")[1])
        # The classifier is not part of any VPR model; drop it so it is neither trained nor hashed.
        self.net.classifier = nn.Identity()

    def load_imagenet(self, path: str | Path) -> None:
        """Strict load of an ImageNet checkpoint in timm layout (classifier keys ignored)."""
        sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith("classifier.")}
        strict_load(self.net, sd, path, f"{self.variant} in timm layout")

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        if self.out_index == -1:
            return BackboneOutput(self.net.forward_features(x))
        n = self.net
        x = n.bn1(n.conv_stem(x))
        for i, block in enumerate(n.blocks):
            x = block(x)
            if i == self._last_block:
                break
        return BackboneOutput(x)


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT
# ---------------------------------------------------------------------------------------------

DINOV2_CONFIGS = {
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
}


class DinoV2Backbone(nn.Module):
    """DINOv2 ViT with Meta's parameter names, so ``dinov2_vit*14_pretrain.pth`` loads strictly.

    Built for 518 px (37x37 position grid); other sizes interpolate the position embeddings with
    DINOv2's own rule (bicubic, scale factor (h + 0.1)/37, no antialias), which the SelaVPR and
    FoL checkpoints were trained with. Blocks are timm ``Block`` modules (same key names).
    """

    patch_size = 14

    def __init__(self, arch: str = "vits14", num_register_tokens: int = 0, interpolate_offset: float = 0.1):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        if arch not in DINOV2_CONFIGS:
            raise WeightsError(f"unknown DINOv2 architecture '{arch}' (known: {', '.join(DINOV2_CONFIGS)})")
        cfg = DINOV2_CONFIGS[arch]
        dim = cfg["embed_dim"]
        self.arch = arch
        self.embed_dim = self.out_channels = dim
        self.num_heads = cfg["num_heads"]
        self.stride = self.patch_size
        self.interpolate_offset = interpolate_offset
        self.num_register_tokens = num_register_tokens
        self.patch_embed = PatchEmbed(
            img_size=518, patch_size=14, in_chans=3, embed_dim=dim, strict_img_size=False, dynamic_img_pad=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 37 * 37, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # unused at inference; kept for strict loads
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            [
                Block(dim, cfg["num_heads"], mlp_ratio=4.0, qkv_bias=True, init_values=1.0, norm_layer=norm)  # type: ignore[arg-type]  # timm accepts any LayerNorm factory
                for _ in range(cfg["depth"])
            ]
        )
        self.norm = norm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    # -- tokens ---------------------------------------------------------------------------
    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.sqrt(n))
        if h == side and w == side:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        sh = (h + self.interpolate_offset) / side
        sw = (w + self.interpolate_offset) / side
        patch_pos = F.interpolate(patch_pos.float(), scale_factor=(sh, sw), mode="bicubic", antialias=False)
        assert patch_pos.shape[-2:] == (h, w), (patch_pos.shape, h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos.to(pos.dtype)], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        B, _, H, W = x.shape
        if H % 14 or W % 14:
            raise ValueError(f"DINOv2 input must be a multiple of 14 px per side, got {H}x{W}")
        h, w = H // 14, W // 14
        tokens = self.patch_embed(x)  # (B, N, C)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w)
        if self.num_register_tokens:
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(B, -1, -1), tokens[:, 1:]], dim=1)
        return tokens, h, w

    @staticmethod
    def cls_attention(block: Any, tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """CLS-to-patch softmax attention of ``block`` on ``tokens``, summed over heads: (B, N)."""
        attn = block.attn
        B, T, C = tokens.shape
        x = block.norm1(tokens)
        qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
        probs = scores.softmax(dim=-1)[:, :, 0, num_prefix:]
        return probs.sum(dim=1)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> BackboneOutput:
        tokens, h, w = self.prepare_tokens(x)
        prefix = 1 + self.num_register_tokens
        attention = None
        for i, block in enumerate(self.blocks):
            if return_attention and i == len(self.blocks) - 1:
                attention = self.cls_attention(block, tokens, prefix)
            tokens = block(tokens)
        tokens = self.norm(tokens)
        patches = tokens[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return BackboneOutput(patches, cls_token=tokens[:, 0], attention=attention)

    def load_meta_checkpoint(self, path: str | Path) -> None:
        """Strict load of Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` (same key names)."""
        strict_load(self, read_state_dict(path), path, f"DINOv2 {self.arch}")
