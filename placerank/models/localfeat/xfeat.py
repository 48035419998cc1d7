"""XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024).

A port of the network with the module names of the shipped ``xfeat.pt`` (strict load) and of
its sparse keypoint extraction:

- the image is averaged to one channel and instance-normalised inside the network, so the input
  scale (0..1 or 0..255) does not matter;
- a 64-d dense descriptor map and a reliability map come out at 1/8 resolution; keypoint logits
  (64 cells + a dustbin) come from the 8x8 pixel blocks of the normalised image;
- keypoints are the 5x5 local maxima of the softmaxed full-resolution keypoint heatmap above
  0.05; each is scored by heatmap value x bilinearly sampled reliability, the best
  ``max_keypoints`` are kept, and descriptors are sampled bicubically and L2-normalised.

The sampling grid maps x to ``2 x / (W - 1) - 1`` with ``align_corners=False``, the convention the
network was trained with (descriptors sampled any other way come out slightly shifted).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.models.checkpoints import strict_load
from placerank.models.localfeat.base import LocalFeatureNet, RawFeatures, register_features

DETECTION_THRESHOLD = 0.05
NMS_KERNEL = 5


class BasicLayer(nn.Module):
    """Conv -> BatchNorm (no affine) -> ReLU: the only building block of XFeat's CNN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.layer = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class XFeatModel(nn.Module):
    """The XFeat CNN. ``forward`` returns (descriptor map (B,64,H/8,W/8), keypoint logits
    (B,65,H/8,W/8), reliability (B,1,H/8,W/8)); H and W must be multiples of 32."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(1)
        self.skip1 = nn.Sequential(nn.AvgPool2d(4, stride=4), nn.Conv2d(1, 24, 1, stride=1, padding=0))
        self.block1 = nn.Sequential(
            BasicLayer(1, 4, stride=1),
            BasicLayer(4, 8, stride=2),
            BasicLayer(8, 8, stride=1),
            BasicLayer(8, 24, stride=2),
        )
        self.block2 = nn.Sequential(BasicLayer(24, 24, stride=1), BasicLayer(24, 24, stride=1))
        self.block3 = nn.Sequential(
            BasicLayer(24, 64, stride=2),
            BasicLayer(64, 64, stride=1),
            BasicLayer(64, 64, 1, padding=0),
        )
        self.block4 = nn.Sequential(
            BasicLayer(64, 64, stride=2),
            BasicLayer(64, 64, stride=1),
            BasicLayer(64, 64, stride=1),
        )
        self.block5 = nn.Sequential(
            BasicLayer(64, 128, stride=2),
            BasicLayer(128, 128, stride=1),
            BasicLayer(128, 128, stride=1),
            BasicLayer(128, 64, 1, padding=0),
        )
        self.block_fusion = nn.Sequential(
            BasicLayer(64, 64, stride=1),
            BasicLayer(64, 64, stride=1),
            nn.Conv2d(64, 64, 1, padding=0),
        )
        self.heatmap_head = nn.Sequential(
            BasicLayer(64, 64, 1, padding=0),
            BasicLayer(64, 64, 1, padding=0),
            nn.Conv2d(64, 1, 1),
            nn.Sigmoid(),
        )
        self.keypoint_head = nn.Sequential(
            BasicLayer(64, 64, 1, padding=0),
            BasicLayer(64, 64, 1, padding=0),
            BasicLayer(64, 64, 1, padding=0),
            nn.Conv2d(64, 65, 1),
        )
        # The dense "fine matcher" MLP (used by XFeat's semi-dense mode) is part of the checkpoint;
        # it is kept so the shipped file loads strictly, even though sparse extraction skips it.
        layers: list[nn.Module] = []
        dims = [128, 512, 512, 512, 512]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b, affine=False), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(512, 64))
        self.fine_matcher = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x = self.norm(x.mean(dim=1, keepdim=True))
        x1 = self.block1(x)
        x2 = self.block2(x1 + self.skip1(x))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = x3.shape[-2:]
        x4 = F.interpolate(x4, size, mode="bilinear", align_corners=False)
        x5 = F.interpolate(x5, size, mode="bilinear", align_corners=False)
        feats = self.block_fusion(x3 + x4 + x5)
        heatmap = self.heatmap_head(feats)
        # 8x8 pixel blocks of the normalised image as 64 channels (channel = row * 8 + col).
        keypoints = self.keypoint_head(F.pixel_unshuffle(x, 8))
        return feats, keypoints, heatmap


def _sample(dense: torch.Tensor, pts: torch.Tensor, H: int, W: int, mode: str) -> torch.Tensor:
    """Sample (B, C, h, w) at (B, N, 2) full-resolution pixel positions -> (B, N, C)."""
    scale = torch.tensor([W - 1, H - 1], device=pts.device, dtype=torch.float32)
    grid = (2.0 * pts.float() / scale - 1.0).unsqueeze(-2).to(dense.dtype)  # (B, N, 1, 2)
    out = F.grid_sample(dense, grid, mode=mode, align_corners=False)  # (B, C, N, 1)
    return out.squeeze(-1).permute(0, 2, 1)


class XFeat(LocalFeatureNet):
    kind = "xfeat"
    dim = 64
    weights_file = "xfeat.pt"
    multiple = 32

    def __init__(self, max_keypoints: int = 2048, detection_threshold: float = DETECTION_THRESHOLD):
        super().__init__(max_keypoints)
        self.net = XFeatModel()
        self.detection_threshold = float(detection_threshold)

    def config_id(self) -> str:
        return f"th{self.detection_threshold:g}"

    def load_checkpoint_state(self, state: object, path: Path) -> None:
        strict_load(self.net, state, path, "XFeat")

    @staticmethod
    def keypoint_heatmap(logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the 65 cell logits, dustbin dropped, cells laid out at full resolution."""
        return F.pixel_shuffle(F.softmax(logits, dim=1)[:, :64], 8)

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[RawFeatures]:
        B, _, H0, W0 = images.shape
        H, W = (H0 // 32) * 32, (W0 // 32) * 32
        if H < 32 or W < 32:
            raise ValueError(f"XFeat needs inputs of at least 32x32 px, got {W0}x{H0}")
        x = images if (H, W) == (H0, W0) else F.interpolate(images, (H, W), mode="bilinear", align_corners=False)
        with self.autocast(x.device):  # the CNN only; selection and sampling in float32
            maps = self.net(x)
        dense, logits, reliability = (m.float() for m in maps)
        dense = F.normalize(dense, dim=1)
        heat = self.keypoint_heatmap(logits)  # (B, 1, H, W)
        local_max = F.max_pool2d(heat, NMS_KERNEL, stride=1, padding=NMS_KERNEL // 2)
        peaks = (heat == local_max) & (heat > self.detection_threshold)
        out = []
        for b in range(B):
            yx = peaks[b, 0].nonzero()  # (N, 2) row, col
            pts = yx.flip(-1).float()  # (x, y)
            s = heat[b, 0, yx[:, 0], yx[:, 1]]
            s = s * _sample(reliability[b : b + 1], pts[None], H, W, "bilinear")[0, :, 0]
            order = torch.argsort(-s)[: self.max_keypoints]
            pts, s = pts[order], s[order]
            keep = s > 0
            pts, s = pts[keep], s[keep]
            desc = F.normalize(_sample(dense[b : b + 1], pts[None], H, W, "bicubic")[0], dim=-1)
            if (H, W) != (H0, W0):  # back to the frame of the given images
                pts = (pts + 0.5) * torch.tensor([W0 / W, H0 / H], device=pts.device) - 0.5
            out.append(RawFeatures(pts, desc, s))
        return out


@register_features("xfeat")
def _xfeat(max_keypoints: int = 2048) -> XFeat:
    return XFeat(max_keypoints=max_keypoints)
