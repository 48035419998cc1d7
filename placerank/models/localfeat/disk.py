"""DISK (Tyszkiewicz et al., "DISK: Learning local features with policy gradient", NeurIPS 2020),
through ``kornia.feature.DISK`` with the paper's "depth" checkpoint (``disk-depth-save.pth``,
stored as ``{"extractor": state_dict}``; kornia's U-Net uses the same ``unet.*`` names).

Keypoints are the 5x5 local maxima of the detection heatmap above 0 (its raw logit), strongest
``max_keypoints`` kept; descriptors are read at the keypoint pixel and L2-normalised. Inputs
whose sides are not multiples of 16 are zero-padded at the bottom/right and the padding is cut
from the output maps, so no keypoint lands in the padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from placerank.errors import WeightsError
from placerank.models.checkpoints import strict_load
from placerank.models.localfeat.base import LocalFeatureNet, RawFeatures, register_features


class DISK(LocalFeatureNet):
    kind = "disk"
    dim = 128
    weights_file = "disk-depth-save.pth"
    multiple = 16

    def __init__(self, max_keypoints: int = 2048, window_size: int = 5, score_threshold: float = 0.0):
        super().__init__(max_keypoints)
        import kornia.feature as KF

        self.net = KF.DISK()
        self.window_size = int(window_size)
        self.score_threshold = float(score_threshold)

    def config_id(self) -> str:
        return f"w{self.window_size}-th{self.score_threshold:g}"

    def load_checkpoint_state(self, state: object, path: Path) -> None:
        if not isinstance(state, Mapping) or "extractor" not in state:
            raise WeightsError(f"{path}: weights do not fit DISK (expected a dict with an 'extractor' state_dict)")
        strict_load(self.net, state["extractor"], path, "DISK")

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[RawFeatures]:
        # kornia's DISK.forward with only the U-Net autocast: NMS and descriptor reads in float32.
        from kornia.feature.disk.detector import heatmap_to_keypoints

        h, w = images.shape[-2:]
        pad = (0, -w % self.multiple, 0, -h % self.multiple)
        padded = F.pad(images, pad).contiguous(memory_format=torch.channels_last) if any(pad) else images
        with self.autocast(images.device):
            heatmaps, descriptors = self.net.heatmap_and_dense_descriptors(padded)
        heatmaps, descriptors = heatmaps[..., :h, :w].float(), descriptors[..., :h, :w].float()
        keypoints = heatmap_to_keypoints(
            heatmaps, n=self.max_keypoints, window_size=self.window_size, score_threshold=self.score_threshold
        )
        feats = [k.merge_with_descriptors(d) for k, d in zip(keypoints, descriptors)]
        return [RawFeatures(f.keypoints.float(), f.descriptors.float(), f.detection_scores.float()) for f in feats]


@register_features("disk")
def _disk(max_keypoints: int = 2048) -> DISK:
    return DISK(max_keypoints=max_keypoints)
