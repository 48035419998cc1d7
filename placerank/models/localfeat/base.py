"""Common ground for the pretrained local-feature networks (XFeat, ALIKED, DISK).

Every extractor takes a batch of RGB images in [0, 1] at the network's input size and returns,
per image, keypoints in *input* pixels (x, y; pixel centres at integer coordinates), L2-normalised
descriptors and detector scores. :func:`to_original_pixels` maps those keypoints back to the
original photo, so stored features never depend on the resize used at extraction time.

Inference runs the way the hardware is fastest at (issue 19): weights and input in
``channels_last``, under ``torch.inference_mode`` (:meth:`LocalFeatureNet.extract`). In fp32 that
changes nothing measurable (the same keypoints, descriptors within 1e-5). ``precision`` bf16 /
fp16 autocasts only the dense CNN (:meth:`LocalFeatureNet.autocast`); keypoint selection, sub-pixel
refinement and descriptor sampling stay float32, since NMS on bfloat16 scores (8-bit mantissa)
would turn neighbouring maxima into ties.

Weights are loaded strictly: a file whose tensor names or shapes differ from the architecture is
refused with a one-line :class:`~placerank.errors.WeightsError` instead of half-loading (a
half-loaded detector still returns keypoints, just useless ones, which is the worst failure mode
for a verifier).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from placerank.errors import PlaceRankError
from placerank.models.checkpoints import read_weights
from placerank.models.weights import resolve_weights
from placerank.registry import Registry
from placerank.utils import file_sha256

#: precisions a local-feature network can run its dense CNN in (fp16: CUDA only)
LOCAL_PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RawFeatures:
    """One image's features in the network-input pixel frame (torch tensors, on any device)."""

    keypoints: torch.Tensor  # (N, 2) float (x, y)
    descriptors: torch.Tensor  # (N, D) float, L2-normalised
    scores: torch.Tensor  # (N,) float


class LocalFeatureNet(nn.Module):
    """A pretrained detector + descriptor. Subclasses set ``kind``, ``dim``, ``weights_file`` and
    implement :meth:`detect` on (B, 3, H, W) RGB images in [0, 1]."""

    kind: str = ""
    dim: int = 0
    weights_file: str = ""
    #: input sides must be multiples of this; :meth:`__call__` callers resize or pad accordingly
    multiple: int = 1

    def __init__(self, max_keypoints: int = 2048):
        super().__init__()
        if int(max_keypoints) < 1:
            raise PlaceRankError(f"max_keypoints must be >= 1, got {max_keypoints}")
        self.max_keypoints = int(max_keypoints)
        self.weights_source = "random-init"
        self.weights_sha256 = ""
        self.precision = "fp32"

    def detect(self, images: torch.Tensor) -> list[RawFeatures]:
        """Features of (B, 3, H, W) RGB images in [0, 1]; :meth:`extract` is the fast entry."""
        raise NotImplementedError

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> list[RawFeatures]:
        """:meth:`detect` with the input moved to the weights' device as float32 channels_last
        (the layout the weights are in), in inference mode; outputs are float32."""
        device = next(self.parameters()).device
        images = images.to(device, torch.float32).contiguous(memory_format=torch.channels_last)
        return self.detect(images)

    def set_precision(self, precision: str) -> LocalFeatureNet:
        """Run the dense CNN in ``precision`` ('fp32', 'bf16' or 'fp16' autocast) from now on."""
        if precision not in LOCAL_PRECISIONS:
            raise PlaceRankError(f"precision {precision!r}: use one of {', '.join(LOCAL_PRECISIONS)}")
        self.precision = precision
        return self

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the dense CNN runs in: autocast to :attr:`precision`, or nothing in fp32.
        Subclasses call it around the CNN only and take its outputs back to float32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def config_id(self) -> str:
        """Detection settings that change the extracted features (part of store signatures)."""
        return ""

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: str | Path | None = None) -> LocalFeatureNet:
        """Resolve (explicit path, $PLACERANK_WEIGHTS, ../shared/weights) and strictly load."""
        path = resolve_weights(self.weights_file, weights, self.display_name)
        state = read_weights(path)
        self.load_checkpoint_state(state, path)
        self.weights_source = f"{path.name} sha256:{file_sha256(path)[:12]}"
        self.weights_sha256 = file_sha256(path)
        return self

    def load_checkpoint_state(self, state: object, path: Path) -> None:
        """Take the object stored in the file (state_dict or container) and load it strictly."""
        raise NotImplementedError

    @property
    def display_name(self) -> str:
        return {"xfeat": "XFeat", "aliked": "ALIKED-n16", "disk": "DISK"}.get(self.kind, self.kind)


def to_original_pixels(kpts: np.ndarray, input_hw: tuple[int, int], original_hw: tuple[int, int]) -> np.ndarray:
    """Map (x, y) keypoints from a hard-resized input back to the original image.

    Both frames put pixel centres at integer coordinates, and the resize maps pixel *edges*
    onto each other (PIL / ``align_corners=False``), so x_orig = (x + 0.5) * W/w - 0.5.
    """
    h, w = input_hw
    H, W = original_hw
    out = np.empty_like(kpts, dtype=np.float32)
    out[:, 0] = (kpts[:, 0] + 0.5) * (W / w) - 0.5
    out[:, 1] = (kpts[:, 1] + 0.5) * (H / h) - 0.5
    return out


# -- registry of feature kinds ------------------------------------------------------------------


FEATURES: Registry = Registry("local features", "placerank.models.localfeat", skip=("base",))


def register_features(kind: str, description: str = "") -> Callable:
    return FEATURES.register(kind, description)


def feature_kinds() -> list[str]:
    return FEATURES.names()


def create_features(
    kind: str, weights: str | Path | None = None, max_keypoints: int = 2048, pretrained: bool = True
) -> LocalFeatureNet:
    """Build a local-feature network by kind ('xfeat', 'aliked', 'disk'), in eval mode with
    channels_last weights, its shipped weights loaded strictly (``pretrained=False`` keeps the
    random init, for tests)."""
    net = FEATURES.create(kind, max_keypoints=max_keypoints)
    if pretrained:
        net.load_weights(weights)
    return net.eval().to(memory_format=torch.channels_last)
