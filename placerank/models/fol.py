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

- ``"dense"`` (default of ``fol-vit*``, :data:`VIT_LOCAL_MODE`): every up-conv cell whose
  nearest patch is selected — the official set (~9-16 cells per patch, ~3,000-3,600 per image,
  ~0.8-0.9 MB in float16), so the official weights re-rank as the paper does.
- ``"pool3"`` (default of the CNN, :data:`CNN_LOCAL_MODE`): one 128-d feature per selected
  patch, the mean of the L2-normalised up-conv cells in the 3 x 3 window at the patch centre
  (the descriptor FoL's pseudo-correspondence loss trains). 225 x (256 + 12) B = 60 KB per image
  in the float16 store.
- ``"center"``: one feature per selected patch, the single up-conv cell at the patch centre
  (cell (4r, 4c), which depends on that patch alone: computed without the dense map). Same size.

On held-out GardensPoint (docs/fol.md) ``pool3`` keeps R@1 0.95-0.975 of dense's 1.000 at 15x
less storage and ~235x less scoring time, hence the CNN recipe's default.

Modules: :mod:`~placerank.models.fol_backbones`, :mod:`~placerank.models.fol_aggregator`, this one
(the model), :mod:`~placerank.models.fol_checkpoints` (official files, §7) and
:mod:`~placerank.models.fol_factories` (registry entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess
from placerank.errors import WeightsError
from placerank.models.base import LocalFeatures, VPRModel
from placerank.models.fol_aggregator import LOCAL_MODES, FoLAggregator, FoLConfig, FoLOutput
from placerank.models.local_head import UpConvLocalHead
from placerank.options import parse_options

__all__ = [
    "CNN_LOCAL_MODE",
    "LOCAL_MODES",
    "VIT_LOCAL_MODE",
    "FoLConfig",
    "FoLLocalOptions",
    "FoLModel",
    "FoLOutput",
    "RegionSet",
]

VIT_PREPROCESS = Preprocess(size=(504, 504))  # ImageNet mean/std, hard square resize (§2.2)
CNN_PREPROCESS = Preprocess(size=(360, 640), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # timm tf_ stats
ARCH_LABEL = {"vits14": "ViT-S/14", "vitb14": "ViT-B/14", "vitl14": "ViT-L/14"}
OFFICIAL_FILES = {"vitl14": "FoL_large.pth", "vitb14": "FoL_base.pth"}
VIT_LOCAL_MODE = "dense"  # the official re-ranking cell set (spec §2.6, §5)
CNN_LOCAL_MODE = "pool3"  # the CPU recipe's compact set (docs/fol.md, measured)

# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class RegionSet:
    """One image's selected local descriptors (with gradient in training)."""

    descriptors: torch.Tensor  # (n, 128), L2-normalised
    cells: torch.Tensor  # (n, 2) int64 (row, col) on the up-conv grid
    scores: torch.Tensor  # (n,) region score of the source patch


@dataclass(frozen=True)
class FoLLocalOptions:
    """``local_options`` of :meth:`FoLModel.encode` (None: the model's configured value)."""

    mode: str | None = None  # "pool3" | "center" | "dense"
    num_regions: int | None = None  # top-N patches of the region score


class FoLModel(VPRModel):
    """FoL: backbone -> FoL aggregator (global) + up-conv head on the region (local)."""

    has_local_head = True
    aggregator: FoLAggregator
    upconv: Any  # nn.ConvTranspose2d (with bias) of the shared head
    upconv2: Any
    _head: UpConvLocalHead

    def __init__(self, name: str, backbone: Any, preprocess: Preprocess, cfg: FoLConfig, attention_source: str):
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
        if rows.numel() and bool(((rows % 4 == 0) & (cols % 4 == 0)).all()):
            return self._pooled_centres(fmap, b, rows // 4, cols // 4)
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

    def _pooled_centres(self, fmap: torch.Tensor, b: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """:meth:`pooled_cells` at patch-centre cells (4r, 4c), batched: the head runs once on the
        zero-padded 3 x 3 feature windows of all patches. Zero inputs add nothing to a transposed
        conv, so the window's output cells 3..5 equal the dense map's 4r-1..4r+1; cells outside the
        map (4r-1 < 0 or 4r+1 > 4h-4) are left out of the mean, as ``count_include_pad=False``."""
        h, w = fmap.shape[-2:]
        C = fmap.shape[1]
        windows = F.unfold(F.pad(fmap, (1, 1, 1, 1)), 3)  # (B, C*9, h*w)
        win = windows[b, :, r * w + c].reshape(-1, C, 3, 3)
        L = F.normalize(self._head(win, normalize=False).float(), dim=1)[:, :, 3:6, 3:6]  # (n, D, 3, 3)
        d = torch.arange(-1, 2, device=fmap.device)
        ok_r = ((4 * r[:, None] + d) >= 0) & ((4 * r[:, None] + d) <= 4 * h - 4)  # (n, 3)
        ok_c = ((4 * c[:, None] + d) >= 0) & ((4 * c[:, None] + d) <= 4 * w - 4)
        mask = (ok_r[:, :, None] & ok_c[:, None, :]).to(L.dtype)  # (n, 3, 3)
        return (L * mask[:, None]).sum(dim=(2, 3)) / mask.sum(dim=(1, 2))[:, None]

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
    def encode(
        self,
        images: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        local_options: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[LocalFeatures] | None]:
        """Global descriptors and (when ``local_options`` is given: :class:`FoLLocalOptions`
        keys ``mode``, ``num_regions``) the inference region features (R = Mᵃ) with keypoints
        in original-image pixels, from ONE backbone pass."""
        if local_options is None:
            return self(images), None
        opts = parse_options(FoLLocalOptions, local_options, what="FoL local option")
        mode = opts.mode or self.cfg.local_mode
        if mode not in LOCAL_MODES:
            raise WeightsError(f"unknown FoL local_mode '{mode}' (known: {', '.join(LOCAL_MODES)})")
        out = self.run(images, local_map=mode != "center")
        in_hw = (int(images.shape[-2]), int(images.shape[-1]))
        sizes = list(original_sizes) if original_sizes is not None else [in_hw] * images.shape[0]
        sets = self.region_sets(out, training=False, mode=mode, num_regions=opts.num_regions)
        return out.descriptor, [self._to_pixels(rs, in_hw, size) for rs, size in zip(sets, sizes)]

    def _to_pixels(self, rs: RegionSet, in_hw: tuple[int, int], size: tuple[int, int]) -> LocalFeatures:
        """One region set -> :class:`LocalFeatures` in the original image's pixels."""
        stride = float(self.backbone.stride)
        (in_h, in_w), (oh, ow) = in_hw, size
        cells = rs.cells.float().cpu()
        # cell u sits at map position u/4, i.e. pixel stride*u/4 + stride/2 of the resized input
        # (a "same"-padded CNN map can overhang the input by half a cell: clamp to the image)
        ys = ((cells[:, 0] / 4.0 * stride + stride / 2.0) * (float(oh) / in_h)).clamp(0, oh - 1)
        xs = ((cells[:, 1] / 4.0 * stride + stride / 2.0) * (float(ow) / in_w)).clamp(0, ow - 1)
        return LocalFeatures(
            keypoints=torch.stack([xs, ys], dim=1).numpy().astype(np.float32),
            descriptors=rs.descriptors.float().cpu().numpy(),
            scores=rs.scores.float().cpu().numpy(),
            image_size=(int(oh), int(ow)),
        )

    def local_features(
        self,
        images: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]],
        mode: str | None = None,
        num_regions: int | None = None,
    ) -> list[LocalFeatures]:
        """Inference region features only (:meth:`encode`'s local half)."""
        _, local = self.encode(images, original_sizes, {"mode": mode, "num_regions": num_regions})
        assert local is not None
        return local

    def describe(self) -> dict:
        d = super().describe()
        d.update(num_regions=self.cfg.num_regions, local_mode=self.cfg.local_mode, local_dim=self.local_dim)
        return d
