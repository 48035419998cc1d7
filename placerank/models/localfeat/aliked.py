"""ALIKED-n16 (Zhao et al., "ALIKED: A Lighter Keypoint and Descriptor Extraction Network via
Deformable Transformation", IEEE T-IM 2023), through ``kornia.feature.ALIKED``.

kornia 0.9 ships the architecture with the same module names as the shipped ``aliked-n16.pth``
(``block1..4, conv1..4, score_head, desc_head``), using torchvision's ``deform_conv2d`` for the
deformable blocks. Its own ``from_pretrained`` downloads and loads non-strictly; here the local
file is loaded strictly. The one tensor the file does not carry, ``dkd.hw_grid``, is the fixed
(2r+1)^2 coordinate grid of the soft-argmax refinement, built from ``nms_radius``.

Detection: keypoints are the strict 5x5 local maxima of the score map, the strongest
``max_keypoints`` of them (kornia's top-k mode, ``detection_threshold=0``). LightGlue's default
instead keeps maxima above 0.2 (capped at ``max_keypoints``); on GardensPoint night frames that
leaves 280-1400 keypoints, and the top-k mode doubles the inliers of true matches (night query vs
its day frame at 360x640: 66-343 inliers against 24-151) while the best wrong candidate's
chance inliers stay at 33-52, so every query separated better. Pass ``detection_threshold=0.2``
for the LightGlue behaviour.
"""

from __future__ import annotations

from pathlib import Path

import torch

from placerank.errors import PlaceRankError
from placerank.models.checkpoints import strict_load
from placerank.models.localfeat.base import LocalFeatureNet, RawFeatures, register_features


class ALIKED(LocalFeatureNet):
    kind = "aliked"
    dim = 128
    weights_file = "aliked-n16.pth"
    multiple = 32

    def __init__(self, max_keypoints: int = 2048, detection_threshold: float = 0.0, nms_radius: int = 2):
        super().__init__(max_keypoints)
        import kornia
        import kornia.feature as KF

        if not hasattr(KF, "ALIKED"):
            raise PlaceRankError(f"ALIKED needs kornia >= 0.9 (installed: kornia {kornia.__version__})")
        self.net = KF.ALIKED(
            model_name="aliked-n16",
            max_num_keypoints=self.max_keypoints,
            detection_threshold=float(detection_threshold),
            nms_radius=int(nms_radius),
        )
        self.detection_threshold = float(detection_threshold)
        self.nms_radius = int(nms_radius)

    def config_id(self) -> str:
        return f"th{self.detection_threshold:g}-r{self.nms_radius}"

    def load_checkpoint_state(self, state: object, path: Path) -> None:
        strict_load(self.net, state, path, "ALIKED-n16", computed_buffers=("dkd.hw_grid",))

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[RawFeatures]:
        feats = self.net(images)
        out = []
        for f in feats:
            n = min(len(f.keypoint_scores), self.max_keypoints)
            order = torch.argsort(-f.keypoint_scores)[:n]
            out.append(
                RawFeatures(f.keypoints[order].float(), f.descriptors[order].float(), f.keypoint_scores[order].float())
            )
        return out


@register_features("aliked")
def _aliked(max_keypoints: int = 2048) -> ALIKED:
    return ALIKED(max_keypoints=max_keypoints)
