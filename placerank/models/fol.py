"""FoL — "Focus on Local" (AAAI 2025): region-focused global descriptors + region local features.

Written from ``shared/docs/methods/fol.md`` (the spec of the official code); section numbers
below refer to it. One model class serves every backbone:

- **ViT (faithful, §2):** a DINOv2 ViT (``backbone.model`` = :class:`DinoV2Backbone`, Meta key
  names) whose last 4 blocks and final norm train; the rest runs without autograd. The CLS-to-
  patch attention of the last block (summed over heads) drives the aggregator's dustbin.
- **CNN (``fol-effnet-lite0``):** EfficientNet-Lite0 (ImageNet) cut at its stride-16 stage
  (112 channels; 23 x 40 = 920 patches at 360 x 640), last 4 inverted-residual blocks trainable.
  A CNN has no CLS attention, so FoL's attention has a stated counterpart: a **learned
  per-patch dustbin head** inside the aggregator (``aggregator.dustbin_head``, 1x1 conv +
  sigmoid, so values lie in [0, 1] like a ViT patch's summed attention). It is used everywhere
  FoL uses the attention — the dustbin logit ``1 - Ã``, the extraction map Mᵉ of SAL/CEL and the
  anchors of the pseudo-correspondence loss — and is trained end to end through Sinkhorn like
  SALAD's learned dustbin scalar (it starts as exactly that: a constant 0.15 for every patch).
  The global token, which a ViT takes from its CLS token, is the mean of the feature map. The
  test-time region is the aggregator's own keep-mass map Mᵃ, as for the ViT.

Aggregator (§2.4): SALAD-style optimal transport, 64 clusters x 128 + a 256-d global token =
8448-d, channel-major flatten (c * 64 + k). Region maps (§2.5): keep-mass Cᵣ = P.sum(k)/K,
percentile clipping, softmax; the top-N (default 225) patches of Mᵃ form the test-time region.
Local head (§2.6): :class:`UpConvLocalHead` registered as ``upconv``/``upconv2`` at the model's
top level, so state-dict keys match the official table.

Local features (fixes the official padded 3600 x 128 sets, issue #10): variable-length sets with
pixel positions and region scores, one of three ``local_mode`` s:

- ``"pool3"`` (default): one 128-d feature per selected patch, the mean of the L2-normalised
  up-conv cells in the 3 x 3 window at the patch centre (the descriptor FoL's
  pseudo-correspondence loss trains). 225 x (256 + 12) B = 60 KB per image in the float16 store.
- ``"center"``: one feature per selected patch, the single up-conv cell at the patch centre
  (cell (4r, 4c), which depends on that patch alone: computed without the dense map). Same size.
- ``"dense"``: every up-conv cell whose nearest patch is selected (the official set, ~9-16 per
  patch, ~3,000+ per image, ~0.8 MB in float16); kept for parity measurements.

On held-out GardensPoint (docs/fol.md) ``pool3`` re-ranks best at the 60 KB budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess, normalize_image_size
from placerank.errors import WeightsError
from placerank.models.backbones import DINOV2_CONFIGS, DinoV2Backbone
from placerank.models.base import BackboneOutput, LocalFeatures, VPRModel
from placerank.models.local_head import UpConvLocalHead
from placerank.models.registry import register_model
from placerank.models.weights import resolve_weights
from placerank.utils import file_sha256

LOCAL_MODES = ("center", "pool3", "dense")
VIT_PREPROCESS = Preprocess(size=(504, 504))  # ImageNet mean/std, hard square resize (§2.2)
CNN_PREPROCESS = Preprocess(size=(360, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm tf_ stats
ARCH_LABEL = {"vits14": "ViT-S/14", "vitb14": "ViT-B/14", "vitl14": "ViT-L/14"}
OFFICIAL_FILES = {"vitl14": "FoL_large.pth", "vitb14": "FoL_base.pth"}


@dataclass(frozen=True)
class FoLConfig:
    """Architecture and selection options (defaults = the official code)."""

    num_clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.3
    sinkhorn_iters: int = 3
    attention_threshold: float = 0.01  # Ã = A where A >= 0.01, else 0 (§2.4)
    num_regions: int = 225  # top-N patches of the region score (§2.5)
    local_mode: str = "pool3"
    train_blocks: int = 4  # trainable last blocks (ViT blocks / CNN inverted-residual blocks)
    clip_fraction: float = 0.05  # percentile clipping position (§2.5)
    clip_top: int = 3
    cnn_dustbin_init: float = 0.15  # CNN learned-dustbin head starts at this constant "attention"


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

    def __init__(
        self, variant: str = "tf_efficientnet_lite0", weights=None, pretrained: bool = True, train_blocks: int = 4
    ):
        super().__init__()
        from placerank.models.zoo import effnet_backbone

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


# ---------------------------------------------------------------------------------------------
# Optimal transport and region maps
# ---------------------------------------------------------------------------------------------


def sinkhorn_log(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """SuperGlue-style log-domain optimal transport with a per-patch dustbin row (§2.4).

    ``scores`` (B, K, N) cluster logits, ``dustbin`` (B, N) dustbin logits. Row marginals
    1/(K+N) per cluster and (N-K)/(K+N) for the dustbin, column marginals 1/(K+N); returns
    log P (B, K+1, N) scaled by K+N so every column of the full plan sums to 1.
    """
    B, K, N = scores.shape
    if N <= K:
        raise WeightsError(
            f"FoL's optimal transport needs more patches than clusters: {N} patches, {K} clusters; use a larger input size"
        )
    Z = torch.cat([scores, dustbin.unsqueeze(1)], dim=1).float()
    norm = -math.log(K + N)
    log_mu = torch.full((K + 1,), norm, device=Z.device, dtype=Z.dtype)
    log_mu[-1] = math.log(N - K) + norm
    log_nu = torch.full((N,), norm, device=Z.device, dtype=Z.dtype)
    u = torch.zeros(B, K + 1, device=Z.device, dtype=Z.dtype)
    v = torch.zeros(B, N, device=Z.device, dtype=Z.dtype)
    for _ in range(iters):
        u = log_mu[None] - torch.logsumexp(Z + v[:, None, :], dim=2)
        v = log_nu[None] - torch.logsumexp(Z + u[:, :, None], dim=1)
    return Z + u[:, :, None] + v[:, None, :] - norm


def clip_softmax(values: torch.Tensor, fraction: float = 0.05, top: int = 3) -> torch.Tensor:
    """Percentile clipping then softmax over positions (§2.5): per row, the ``top`` largest
    entries are overwritten with the value at 0-based position floor(fraction * N) of the
    descending sort. Order-preserving, so the top-N selection of Mᵃ equals that of Cᵣ."""
    N = values.shape[1]
    sorted_vals, order = values.sort(dim=1, descending=True)
    q = sorted_vals[:, min(int(fraction * N), N - 1)]
    k = min(top, N)
    clipped = values.scatter(1, order[:, :k], q[:, None].expand(-1, k))
    return clipped.softmax(dim=1)


@dataclass
class FoLOutput:
    """Everything one FoL forward produces (§2.7); maps are (B, N) over the h x w patch grid."""

    descriptor: torch.Tensor  # (B, D) L2-normalised global descriptor
    feature_map: torch.Tensor  # (B, C, h, w) backbone patch features
    attention: torch.Tensor  # (B, N) raw attention A (ViT) / learned dustbin head (CNN)
    attention_thr: torch.Tensor  # (B, N) Ã
    plan: torch.Tensor  # (B, K, N) Sinkhorn plan without the dustbin row
    keep_mass: torch.Tensor  # (B, N) Cᵣ = sum_k P / K
    map_a: torch.Tensor  # (B, N) Mᵃ = softmax(clip(Cᵣ))
    map_e: torch.Tensor  # (B, N) Mᵉ = softmax(clip(A))
    local_map: torch.Tensor | None = None  # (B, 128, 4h-3, 4w-3) un-normalised up-conv output

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.feature_map.shape[-2]), int(self.feature_map.shape[-1])

    def region_score(self, training: bool) -> torch.Tensor:
        """R = Mᵃ + Mᵉ in training, Mᵃ at inference (pitfall 7)."""
        return self.map_a + self.map_e if training else self.map_a


class FoLAggregator(nn.Module):
    """SALAD-style aggregator whose dustbin is ``1 - Ã`` (§2.4).

    ``attention_source="vit"`` reads A from the backbone's CLS attention and the global token
    from its CLS token; ``"learned"`` (CNN counterpart) predicts A with ``dustbin_head`` and
    uses the mean feature as the global token.
    """

    def __init__(self, in_channels: int, cfg: FoLConfig, attention_source: str = "vit"):
        super().__init__()
        self.cfg = cfg
        self.attention_source = attention_source
        h, K, d = cfg.hidden_dim, cfg.num_clusters, cfg.cluster_dim
        self.token_features = nn.Sequential(nn.Linear(in_channels, h), nn.ReLU(), nn.Linear(h, cfg.token_dim))
        self.cluster_features = nn.Sequential(
            nn.Conv2d(in_channels, h, 1), nn.Dropout(cfg.dropout), nn.ReLU(), nn.Conv2d(h, d, 1)
        )
        self.score = nn.Sequential(nn.Conv2d(in_channels, h, 1), nn.Dropout(cfg.dropout), nn.ReLU(), nn.Conv2d(h, K, 1))
        if attention_source == "learned":
            self.dustbin_head = nn.Conv2d(in_channels, 1, 1)
            nn.init.zeros_(self.dustbin_head.weight)
            nn.init.constant_(self.dustbin_head.bias, math.log(cfg.cnn_dustbin_init / (1 - cfg.cnn_dustbin_init)))
        elif attention_source != "vit":
            raise ValueError(f"attention_source must be 'vit' or 'learned', got {attention_source!r}")

    @property
    def output_dim(self) -> int:
        return self.cfg.token_dim + self.cfg.num_clusters * self.cfg.cluster_dim

    def assign(self, out: BackboneOutput) -> FoLOutput:
        cfg = self.cfg
        x = out.feature_map
        if self.attention_source == "vit":
            if out.attention is None or out.cls_token is None:
                raise ValueError("FoL's ViT aggregator needs the backbone's CLS token and CLS attention")
            A, token = out.attention, out.cls_token
        else:
            A = torch.sigmoid(self.dustbin_head(x)).flatten(1)
            token = x.mean(dim=(2, 3))
        A = A.float()
        A_thr = A * (cfg.attention_threshold <= A).to(A.dtype)
        f = self.cluster_features(x).flatten(2).float()  # (B, d, N)
        s = self.score(x).flatten(2).float()  # (B, K, N)
        log_p = sinkhorn_log(s, 1.0 - A_thr, cfg.sinkhorn_iters)
        P = log_p[:, :-1].exp()  # (B, K, N)
        V = F.normalize(torch.einsum("bdn,bkn->bdk", f, P), dim=1).flatten(1)  # channel-major c*K + k
        g = F.normalize(self.token_features(token).float(), dim=-1)
        desc = F.normalize(torch.cat([g, V], dim=-1), dim=-1)
        keep = P.sum(dim=1) / cfg.num_clusters
        return FoLOutput(
            descriptor=desc,
            feature_map=x,
            attention=A,
            attention_thr=A_thr,
            plan=P,
            keep_mass=keep,
            map_a=clip_softmax(keep, cfg.clip_fraction, cfg.clip_top),
            map_e=clip_softmax(A, cfg.clip_fraction, cfg.clip_top),
        )

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        return self.assign(out).descriptor


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class RegionSet:
    """One image's selected local descriptors (with gradient in training)."""

    descriptors: torch.Tensor  # (n, 128), L2-normalised
    cells: torch.Tensor  # (n, 2) int64 (row, col) on the up-conv grid
    scores: torch.Tensor  # (n,) region score of the source patch


class FoLModel(VPRModel):
    """FoL: backbone -> FoL aggregator (global) + up-conv head on the region (local)."""

    def __init__(self, name: str, backbone: nn.Module, preprocess: Preprocess, cfg: FoLConfig, attention_source: str):
        if cfg.local_mode not in LOCAL_MODES:
            raise WeightsError(f"unknown FoL local_mode '{cfg.local_mode}' (known: {', '.join(LOCAL_MODES)})")
        aggregator = FoLAggregator(backbone.out_channels, cfg, attention_source)
        super().__init__(name, backbone, aggregator, preprocess, aggregator.output_dim)
        self.cfg = cfg
        head = UpConvLocalHead(backbone.out_channels, names=("upconv", "upconv2"))
        self.__dict__["_head"] = head  # not a child: its two convs are registered below, at top level
        self.upconv = head.upconv
        self.upconv2 = head.upconv2
        self.local_dim = head.out_channels

    # -- trainable parameters ------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward -------------------------------------------------------------------------
    def run(self, images: torch.Tensor, local_map: bool = False) -> FoLOutput:
        out = self.aggregator.assign(self.backbone(images))
        if local_map:
            out.local_map = self._head(out.feature_map, normalize=False)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregator.assign(self.backbone(images)).descriptor

    # -- regions -------------------------------------------------------------------------
    def select_regions(self, region_score: torch.Tensor, num_regions: int | None = None) -> torch.Tensor:
        """Top-N patch indices per image (B, n), sorted by patch index (row-major, like the
        official mask). n = min(num_regions, N)."""
        n = min(int(num_regions or self.cfg.num_regions), region_score.shape[1])
        idx = region_score.topk(n, dim=1).indices
        return idx.sort(dim=1).values

    def _center_descriptors(self, fmap: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Up-conv cells (4r, 4c) of the selected patches, without the dense map.

        A stride-2, padding-1, 3x3 transposed conv writes output 2i from input i through the
        kernel's centre tap only, so cell (4r, 4c) = W2c^T relu(W1c^T x_rc + b1) + b2: a per-patch
        MLP with the centre taps. Exactly equal to the dense map at those cells.
        """
        B, C = fmap.shape[:2]
        x = torch.gather(fmap.flatten(2), 2, idx[:, None, :].expand(-1, C, -1))  # (B, C, n)
        w1 = self.upconv.weight[:, :, 1, 1]  # (C, 256)
        w2 = self.upconv2.weight[:, :, 1, 1]  # (256, 128)
        hdn = F.relu(torch.einsum("bcn,cm->bmn", x, w1) + self.upconv.bias[None, :, None])
        return torch.einsum("bmn,md->bnd", hdn, w2) + self.upconv2.bias[None, None, :]

    def pooled_cells(self, fmap: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """3 x 3 means of the L2-normalised up-conv map around cells (rows, cols) of images ``b``,
        with gradient, computed from small feature-map windows instead of the dense map.

        Up-conv cell u depends only on feature rows in [(u-3)/4, (u+3)/4], so running the head on
        the window [floor((u-4)/4), ceil((u+4)/4)] (clipped to the map) gives exactly the dense
        map's cells u-1..u+1. Training uses this for the pseudo-correspondence loss (<= 5 cells per
        image) so the dense map itself can be computed without autograd. Equals
        ``avg_pool2d(normalize(L), 3, 1, 1, count_include_pad=False)`` at those cells (tested).
        """
        h, w = fmap.shape[-2:]
        Hl, Wl = 4 * h - 3, 4 * w - 3
        out = []
        for bi, u, v in zip(b.tolist(), rows.tolist(), cols.tolist()):
            r0, r1 = max(0, (u - 4) // 4), min(h - 1, -((-(u + 4)) // 4))
            c0, c1 = max(0, (v - 4) // 4), min(w - 1, -((-(v + 4)) // 4))
            L = F.normalize(self._head(fmap[bi : bi + 1, :, r0 : r1 + 1, c0 : c1 + 1], normalize=False).float(), dim=1)
            u0, u1 = max(0, u - 1), min(Hl - 1, u + 1)
            v0, v1 = max(0, v - 1), min(Wl - 1, v + 1)
            win = L[0, :, u0 - 4 * r0 : u1 - 4 * r0 + 1, v0 - 4 * c0 : v1 - 4 * c0 + 1]
            out.append(win.mean(dim=(1, 2)))
        if not out:
            return fmap.new_zeros(0, self.local_dim)
        return torch.stack(out)

    def region_sets(
        self, out: FoLOutput, training: bool, mode: str | None = None, num_regions: int | None = None
    ) -> list[RegionSet]:
        """Selected local descriptors per image for region score R (training or inference)."""
        mode = mode or self.cfg.local_mode
        if mode not in LOCAL_MODES:
            raise WeightsError(f"unknown FoL local_mode '{mode}' (known: {', '.join(LOCAL_MODES)})")
        R = out.region_score(training)
        idx = self.select_regions(R, num_regions)
        h, w = out.grid
        Hl, Wl = 4 * h - 3, 4 * w - 3
        r, c = idx // w, idx % w
        sel_scores = torch.gather(R, 1, idx)
        sets: list[RegionSet] = []
        if mode == "center":
            desc = F.normalize(self._center_descriptors(out.feature_map, idx).float(), dim=-1)
            cells = torch.stack([4 * r, 4 * c], dim=-1)
            return [RegionSet(desc[b], cells[b], sel_scores[b]) for b in range(idx.shape[0])]
        L = out.local_map if out.local_map is not None else self._head(out.feature_map, normalize=False)
        if mode == "pool3":
            Ln = F.normalize(L.float(), dim=1)
            pooled = F.avg_pool2d(Ln, 3, stride=1, padding=1, count_include_pad=False)
            for b in range(idx.shape[0]):
                d = pooled[b][:, 4 * r[b], 4 * c[b]].t()
                sets.append(RegionSet(F.normalize(d, dim=-1), torch.stack([4 * r[b], 4 * c[b]], -1), sel_scores[b]))
            return sets
        # dense: every cell whose nearest-neighbour source patch (floor(u*h/H')) is selected
        src_r = (torch.arange(Hl, device=L.device) * h) // Hl
        src_c = (torch.arange(Wl, device=L.device) * w) // Wl
        src = (src_r[:, None] * w + src_c[None, :]).flatten()  # (Hl*Wl,) patch index of each cell
        for b in range(idx.shape[0]):
            mask = torch.zeros(h * w, dtype=torch.bool, device=L.device)
            mask[idx[b]] = True
            cell_idx = torch.nonzero(mask[src], as_tuple=False).squeeze(1)
            d = L[b].flatten(1)[:, cell_idx].t()
            score_of_patch = torch.zeros(h * w, device=L.device, dtype=R.dtype)
            score_of_patch[idx[b]] = sel_scores[b]
            cells = torch.stack([cell_idx // Wl, cell_idx % Wl], dim=-1)
            sets.append(RegionSet(F.normalize(d.float(), dim=-1), cells, score_of_patch[src[cell_idx]]))
        return sets

    @torch.no_grad()
    def local_features(
        self,
        images: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]],
        mode: str | None = None,
        num_regions: int | None = None,
    ) -> list[LocalFeatures]:
        """Inference region features (R = Mᵃ) with keypoints in original-image pixels."""
        mode = mode or self.cfg.local_mode
        out = self.run(images, local_map=mode != "center")
        stride = float(self.backbone.stride)
        in_h, in_w = images.shape[-2:]
        result = []
        for (oh, ow), rs in zip(
            original_sizes, self.region_sets(out, training=False, mode=mode, num_regions=num_regions)
        ):
            cells = rs.cells.float().cpu()
            # cell u sits at map position u/4, i.e. pixel stride*u/4 + stride/2 of the resized input
            # (a "same"-padded CNN map can overhang the input by half a cell: clamp to the image)
            ys = ((cells[:, 0] / 4.0 * stride + stride / 2.0) * (float(oh) / in_h)).clamp(0, oh - 1)
            xs = ((cells[:, 1] / 4.0 * stride + stride / 2.0) * (float(ow) / in_w)).clamp(0, ow - 1)
            result.append(
                LocalFeatures(
                    keypoints=torch.stack([xs, ys], dim=1).numpy().astype(np.float32),
                    descriptors=rs.descriptors.float().cpu().numpy(),
                    scores=rs.scores.float().cpu().numpy(),
                    image_size=(int(oh), int(ow)),
                )
            )
        return result

    def describe(self) -> dict:
        d = super().describe()
        d.update(num_regions=self.cfg.num_regions, local_mode=self.cfg.local_mode, local_dim=self.local_dim)
        return d


# ---------------------------------------------------------------------------------------------
# Official checkpoints (FoL_large.pth / FoL_base.pth, §7)
# ---------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list:
    """numpy objects the official training checkpoint may hold besides tensors (``recalls``,
    ``best_r5``), allowed under both numpy-1 and numpy-2 module names; nothing executable."""
    core = getattr(np, "_core", None) or np.core
    items = []
    for fn_name in ("_reconstruct", "scalar"):
        fn = getattr(core.multiarray, fn_name)
        items += [(fn, f"numpy.core.multiarray.{fn_name}"), (fn, f"numpy._core.multiarray.{fn_name}")]
    items.append(np.ndarray)
    items.append(np.dtype)
    for t in (np.float64, np.float32, np.int64, np.int32, np.bool_):
        items.append(type(np.dtype(t)))
    return items


def read_checkpoint(path: str | Path):
    """``torch.load`` with ``weights_only=True``, also accepting numpy arrays/scalars; memory-
    mapped, so a 1.2 GB ViT-L file is not read twice into RAM (tensors are assigned from it)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file does not exist")
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) torch files cannot be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as first:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:
            msg = str(first).strip().splitlines()[0][:120] if str(first).strip() else ""
            raise WeightsError(f"{path}: cannot read weights ({type(first).__name__}: {msg})") from None


def official_state_dict(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """Official container -> flat state dict: ``model_state_dict`` (or a flat dict), ``module.``
    prefix stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(f"{path}: not a FoL checkpoint (expected a dict with 'model_state_dict' of tensors)")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items()}


def _arch_of(sd: dict[str, torch.Tensor]) -> str | None:
    pe = sd.get("backbone.model.pos_embed")
    if pe is None:
        return None
    depth = len({k.split(".")[3] for k in sd if k.startswith("backbone.model.blocks.")})
    for arch, cfg in DINOV2_CONFIGS.items():
        if cfg["embed_dim"] == pe.shape[-1] and cfg["depth"] == depth:
            return arch
    return None


def load_official_fol(model: FoLModel, path: str | Path) -> None:
    """Strict load of an official FoL checkpoint into ``model`` (which may live on the meta
    device: tensors are then assigned, not copied, halving peak memory for ViT-L)."""
    sd = official_state_dict(read_checkpoint(path), path)
    arch = model.backbone.arch
    found = _arch_of(sd)
    if found is not None and found != arch:
        raise WeightsError(
            f"{path}: checkpoint holds FoL {ARCH_LABEL[found]}, not {ARCH_LABEL[arch]}; use --model fol-{found}"
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{path}: not an official FoL {ARCH_LABEL[arch]} checkpoint ({len(missing)} missing keys"
            f"{', e.g. ' + missing[0] if missing else ''}; {len(unexpected)} unexpected"
            f"{', e.g. ' + unexpected[0] if unexpected else ''})"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{path}: {k} has shape {tuple(sd[k].shape)} in the checkpoint, "
                f"{tuple(v.shape)} in FoL {ARCH_LABEL[arch]}"
            )
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(sd, strict=True, assign=on_meta)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise WeightsError(f"{path}: checkpoint left some FoL tensors uninitialised")
    model.backbone.set_trainable()
    model.invalidate_weights_id()


def _is_official_layout(obj) -> bool:
    if isinstance(obj, dict) and "model_state_dict" in obj:
        return True
    return isinstance(obj, dict) and any(
        isinstance(k, str) and (k.startswith("backbone.model.") or k.startswith("module.backbone.model.")) for k in obj
    )


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
    import dataclasses

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
    """Randomly initialised FoL ViT (under ``torch.device('meta')`` it allocates nothing)."""
    size = normalize_image_size(image_size) or (VIT_PREPROCESS.size if arch != "vitb14" else (322, 322))
    if size[0] % 14 or size[1] % 14:
        raise WeightsError(f"DINOv2 input size must be a multiple of 14 px, got {size[0]}x{size[1]}")
    cfg = _config(num_regions, local_mode, train_blocks)
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
    from placerank.models.checkpoints import is_placerank_checkpoint, load_placerank_checkpoint

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
    obj = read_checkpoint(weights)
    if _is_official_layout(obj):
        with torch.device("meta"):
            model = build_fol_vit(arch, image_size, num_regions, local_mode, train_blocks)
        load_official_fol(model, weights)
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
    from placerank.models.checkpoints import is_placerank_checkpoint, load_placerank_checkpoint

    if weights is not None and is_placerank_checkpoint(weights):
        model = load_placerank_checkpoint(weights, expected_name="fol-effnet-lite0")
        return apply_overrides(model, image_size, num_regions, local_mode)
    return build_fol_cnn(
        "tf_efficientnet_lite0", weights, pretrained, image_size, num_regions, local_mode, train_blocks
    )


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
