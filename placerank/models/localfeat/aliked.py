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

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[RawFeatures]:
        # kornia's ALIKED.forward in its three steps, so that only the dense CNN is autocast: the
        # soft-argmax refinement (DKD) and the deformable descriptor head (SDDH) stay float32.
        net = self.net
        with self.autocast(images.device):
            feature_map, score_map = net.extract_dense_map(images)
        keypoints, kptscores, _ = net.dkd(score_map.float())
        descriptors, _ = net.desc_head(feature_map.float(), keypoints)
        h, w = images.shape[-2:]
        wh = torch.tensor([w - 1, h - 1], device=images.device, dtype=torch.float32)
        out = []
        for kp, desc, sc in zip(keypoints, descriptors, kptscores):
            n = min(len(sc), self.max_keypoints)
            order = torch.argsort(-sc)[:n]
            pts = wh * (kp[order].float() + 1) / 2.0  # normalised [-1, 1] -> pixels (x, y)
            out.append(RawFeatures(pts, desc[order].float(), sc[order].float()))
        return out


@register_features("aliked")
def _aliked(max_keypoints: int = 2048) -> ALIKED:
    return ALIKED(max_keypoints=max_keypoints)
