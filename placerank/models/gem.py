"""GeM pooling (generalised mean, learnable exponent p)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.models.base import BackboneOutput


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): ``mean(clamp(x, eps)^p)^(1/p)`` over locations."""
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p).flatten(1)


class GeM(nn.Module):
    """GeM over a backbone feature map. ``normalize_input`` L2-normalises each location first
    (SelaVPR's "L2 before pool"); the caller L2-normalises the result."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, normalize_input: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.normalize_input = normalize_input

    def forward(self, out: BackboneOutput | torch.Tensor) -> torch.Tensor:
        x = out.feature_map if isinstance(out, BackboneOutput) else out
        if self.normalize_input:
            x = F.normalize(x, dim=1)
        return gem(x, self.p, self.eps)
