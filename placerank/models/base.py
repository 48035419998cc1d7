"""Contracts between pipeline stages: backbone output, VPR model, local features.

Every aggregator, local head and loss takes a backbone's feature map, so every method runs on
any backbone; ViT-only inputs (class token, last-block CLS attention) are optional fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from placerank.data.images import Preprocess
from placerank.errors import PlaceRankError
from placerank.utils import state_dict_sha256


@dataclass
class BackboneOutput:
    """``feature_map`` (B, C, h, w); ViTs also give ``cls_token`` (B, C) and, on request,
    ``attention`` (B, N): the last block's CLS-to-patch attention summed over heads."""

    feature_map: torch.Tensor
    cls_token: torch.Tensor | None = None
    attention: torch.Tensor | None = None


@dataclass
class LocalFeatures:
    """Local evidence for one image, in the *original* image's pixel frame.

    ``keypoints`` (N, 2) float32 as (x, y); ``descriptors`` (N, D), L2-normalised; ``scores``
    (N,) optional per-feature weight (detector score, FoL region score); ``image_size`` (H, W).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray | None = None
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])


class VPRModel(nn.Module):
    """A backbone plus an aggregator producing one L2-normalised float32 global descriptor.

    Subclasses (SelaVPR, FoL, SFRS) add local heads and losses but keep this interface, so the
    extraction, cache, index and eval code never needs to know which method it runs.
    """

    # Backbones and aggregators are duck-typed (a backbone has ``out_channels``/``stride`` and
    # returns a BackboneOutput); declared here because torch's ``Module.__getattr__`` stubs type
    # every sub-module attribute as ``Tensor | Module``.
    backbone: Any
    aggregator: Any

    def __init__(
        self, name: str, backbone: nn.Module, aggregator: nn.Module, preprocess: Preprocess, descriptor_dim: int
    ):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.aggregator = aggregator
        self.preprocess = preprocess
        self.descriptor_dim = int(descriptor_dim)
        self.weights_source = "random-init"
        self._weights_id: str | None = None

    # -- identity -------------------------------------------------------------------------
    @property
    def weights_id(self) -> str:
        """Hash of the parameters actually in the model (what caches and indexes are keyed by)."""
        if self._weights_id is None:
            self._weights_id = state_dict_sha256(self.state_dict())[:16]
        return self._weights_id

    def invalidate_weights_id(self) -> None:
        self._weights_id = None

    # -- inference ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone(images)
        desc = self.aggregator(out)
        return F.normalize(desc.float(), dim=-1)

    #: True for models whose own local head gives re-ranking features (FoL, SelaVPR)
    has_local_head: bool = False

    def encode(
        self,
        images: torch.Tensor,
        original_sizes: Sequence[tuple[int, int]] | None = None,
        local_options: dict | None = None,
    ) -> tuple[torch.Tensor, list[LocalFeatures] | None]:
        """Global descriptors (B, D) and, when ``local_options`` is given (a dict, possibly empty,
        of the local head's options such as FoL's ``mode``), each image's local features in
        original-image pixels — from ONE backbone pass. Models with a local head override this;
        extraction calls it so that global + local never run the backbone twice."""
        if local_options is not None:
            raise PlaceRankError(f"model '{self.name}' has no local head")
        return self(images), None

    @property
    def needs_data_init(self) -> bool:
        """True when an aggregator must be initialised from real features (e.g. NetVLAD k-means)."""
        init = getattr(self.aggregator, "initialised", None)
        return init is not None and not bool(init)

    def init_from_images(self, paths: Sequence[str | Path], **kwargs) -> None:
        """Data-driven initialisation (NetVLAD k-means) from unlabeled images: the aggregator's
        own ``init_from_images(model, paths, ...)`` does it (this contract never imports one)."""
        init = getattr(self.aggregator, "init_from_images", None)
        if init is None:
            raise PlaceRankError(f"model {self.name} has no NetVLAD layer to initialise")
        init(self, paths, **kwargs)
        self.invalidate_weights_id()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "descriptor_dim": self.descriptor_dim,
            "input_size": list(self.preprocess.size),
            "weights": self.weights_source,
            "weights_id": self.weights_id,
        }
