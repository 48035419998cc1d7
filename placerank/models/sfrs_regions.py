"""SFRS region descriptors (Ge et al., ECCV 2020, spec §2.4): pure functions shared by the
model (inference, :meth:`SFRSModel.regions_from_map`) and the training losses.

An image has 9 descriptors — global, 4 halves, 4 quarters — built from its *unnormalised*
quarter VLADs: halves and the global one are sums of quarters and every one is normalised only
afterwards (VLAD is additive over locations, so the global descriptor is exactly the whole-image
VLAD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REGION_NAMES = ("global", "top", "bottom", "left", "right", "top_left", "top_right", "bottom_left", "bottom_right")


def quarter_masks(h: int, w: int, device=None) -> torch.Tensor:
    """(4, h, w) float masks of the 2 x 2 blocks TL, TR, BL, BR; h and w must be even."""
    if h % 2 or w % 2:
        raise ValueError(
            f"SFRS region descriptors need an even feature map, got {h}x{w}: pick an input size "
            f"whose feature map has even height and width"
        )
    m = torch.zeros(4, h, w, device=device)
    m[0, : h // 2, : w // 2] = 1
    m[1, : h // 2, w // 2 :] = 1
    m[2, h // 2 :, : w // 2] = 1
    m[3, h // 2 :, w // 2 :] = 1
    return m


def regions_from_quarters(quarters: torch.Tensor) -> torch.Tensor:
    """Unnormalised quarter VLADs (B, 4, K, D) in order TL, TR, BL, BR -> the 9 normalised
    region descriptors (B, 9, K*D) in :data:`REGION_NAMES` order (intra-L2, cluster-major
    flatten, L2 — applied after the sums)."""
    tl, tr, bl, br = quarters.unbind(1)
    regions = torch.stack([tl + tr + bl + br, tl + tr, bl + br, tl + bl, tr + br, tl, tr, bl, br], dim=1)
    regions = F.normalize(regions, dim=-1)  # intra-normalisation over D per cluster
    return F.normalize(regions.flatten(2), dim=-1)
