"""The up-convolution local head shared by SelaVPR and FoL.

Two stride-2 3x3 transposed convolutions (C -> 256 -> 128, ReLU between, none after) turn an
h x w feature map into a (4h-3) x (4w-3) grid of 128-d dense local features. Output index 2i
maps to input index i, so grid cell (u, v) sits at input-map position (u/4, v/4) — see
:func:`grid_positions` for pixel coordinates.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class UpConvLocalHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        mid_channels: int = 256,
        out_channels: int = 128,
        names: tuple[str, str] = ("upconv1", "upconv2"),
    ):
        super().__init__()
        self._names = names
        setattr(self, names[0], nn.ConvTranspose2d(in_channels, mid_channels, 3, stride=2, padding=1))
        setattr(self, names[1], nn.ConvTranspose2d(mid_channels, out_channels, 3, stride=2, padding=1))
        self.out_channels = out_channels

    def forward(self, fmap: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, h, w) -> (B, 128, 4h-3, 4w-3); L2-normalised per cell when ``normalize``."""
        x = getattr(self, self._names[0])(fmap)
        x = getattr(self, self._names[1])(F.relu(x))
        return F.normalize(x, dim=1) if normalize else x


def grid_positions(
    grid_h: int, grid_w: int, stride: float, image_size: tuple[int, int], input_size: tuple[int, int]
) -> torch.Tensor:
    """Pixel (x, y) in the *original* image of every cell of a (4h-3)x(4w-3) up-conv grid.

    ``stride`` is the backbone's pixel stride (14 for DINOv2, 32 for EfficientNet); feature-map
    cell i is centred at ``stride*i + stride/2`` in the resized input, and up-conv cell u at map
    position u/4. Returns (grid_h*grid_w, 2) in row-major order.
    """
    in_h, in_w = input_size
    img_h, img_w = image_size
    ys = (torch.arange(grid_h, dtype=torch.float32) / 4.0) * stride + stride / 2.0
    xs = (torch.arange(grid_w, dtype=torch.float32) / 4.0) * stride + stride / 2.0
    yy, xx = torch.meshgrid(ys * (img_h / in_h), xs * (img_w / in_w), indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)
