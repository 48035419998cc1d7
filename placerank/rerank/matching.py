"""Putative matching (mutual nearest neighbours, or LighterGlue for XFeat) and geometric
verification with OpenCV's USAC/MAGSAC.

Verification runs in a *canonical* pixel frame: each image's keypoints (stored in original
pixels) are scaled so that its longest side is ``canonical_side`` (640) px, and the RANSAC
threshold is in those pixels. A 1 px threshold then means the same thing for a 640x360 night
frame and a 4000x3000 photo, and matches the resolution the features were detected at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from placerank.errors import PlaceRankError, WeightsError
from placerank.models.checkpoints import read_weights, strict_load
from placerank.models.weights import resolve_weights
from placerank.rerank.mutual_nn import mutual_nn_pairs  # noqa: F401  (re-exported: putative matches)
from placerank.utils import file_sha256

Geometry = Literal["fundamental", "homography"]


@dataclass(frozen=True)
class VerifyConfig:
    """``threshold_px`` in the canonical frame (longest side ``canonical_side``);
    ``min_matches``: fewer putative matches than this verify nothing (8 is the minimum a
    fundamental matrix needs; 4 for a homography)."""

    geometry: Geometry = "fundamental"
    threshold_px: float = 1.0
    confidence: float = 0.999
    max_iters: int = 10000
    canonical_side: float = 640.0
    min_matches: int = 8

    def __post_init__(self) -> None:
        if self.geometry not in ("fundamental", "homography"):
            raise PlaceRankError(f"unknown geometry '{self.geometry}': use fundamental or homography")
        need = 8 if self.geometry == "fundamental" else 4
        if self.min_matches < need:
            raise PlaceRankError(f"min_matches must be >= {need} for a {self.geometry} matrix, got {self.min_matches}")
        if self.threshold_px <= 0:
            raise PlaceRankError(f"RANSAC threshold must be > 0 px, got {self.threshold_px}")


def canonical_scale(image_size: tuple[int, int], canonical_side: float) -> float:
    h, w = image_size
    longest = max(int(h), int(w))
    return canonical_side / longest if longest > 0 else 1.0


def verify_pairs(
    kpts1: np.ndarray,
    kpts2: np.ndarray,
    pairs: np.ndarray,
    size1: tuple[int, int],
    size2: tuple[int, int],
    cfg: VerifyConfig = VerifyConfig(),
) -> np.ndarray:
    """Boolean inlier mask over ``pairs`` after MAGSAC estimation of ``cfg.geometry``."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(pairs), dtype=bool)
    if len(pairs) < cfg.min_matches:
        return mask
    p1 = np.ascontiguousarray(
        np.asarray(kpts1, dtype=np.float64)[pairs[:, 0]] * canonical_scale(size1, cfg.canonical_side)
    )
    p2 = np.ascontiguousarray(
        np.asarray(kpts2, dtype=np.float64)[pairs[:, 1]] * canonical_scale(size2, cfg.canonical_side)
    )
    try:
        if cfg.geometry == "fundamental":
            model, inl = cv2.findFundamentalMat(
                p1, p2, cv2.USAC_MAGSAC, cfg.threshold_px, cfg.confidence, cfg.max_iters
            )
        else:
            model, inl = cv2.findHomography(
                p1, p2, cv2.USAC_MAGSAC, cfg.threshold_px, maxIters=cfg.max_iters, confidence=cfg.confidence
            )
    except cv2.error:
        # Degenerate configurations (all points on a line, duplicates) have no model: no inliers.
        return mask
    if model is None or inl is None:
        return mask
    return inl.reshape(-1).astype(bool)


# -- LighterGlue ---------------------------------------------------------------------------------
# XFeat's LighterGlue: a 6-layer, 1-head LightGlue on 64-d XFeat descriptors (96-d inside).
LIGHTERGLUE_CONF: dict[str, Any] = dict(
    name="xfeat",
    input_dim=64,
    descriptor_dim=96,
    add_scale_ori=False,
    add_laf=False,
    scale_coef=1.0,
    n_layers=6,
    num_heads=1,
    flash=True,
    mp=False,
    depth_confidence=-1,
    width_confidence=0.95,
    filter_threshold=0.1,
    weights=None,
)
LIGHTERGLUE_FILE = "xfeat-lighterglue.pt"


def lighterglue_state(state: object, path: Path, n_layers: int) -> dict:
    """The ``matcher.*`` tensors of ``xfeat-lighterglue.pt`` under kornia's LightGlue names
    (``self_attn.{i}`` -> ``transformers.{i}.self_attn``, same for ``cross_attn``). The file's
    ``extractor.*`` tensors (a copy of XFeat) are not used here; anything else is refused."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: weights do not fit LighterGlue (expected a state_dict of tensors)")
    other = [k for k in state if not (k.startswith("matcher.") or k.startswith("extractor."))]
    if other or not any(k.startswith("matcher.") for k in state):
        shown = ", ".join(sorted(other)[:3]) if other else "no matcher.* tensors"
        raise WeightsError(
            f"{path}: weights do not fit LighterGlue (expected matcher.* and extractor.* tensors; found {shown})"
        )
    out = {}
    for k, v in state.items():
        if not k.startswith("matcher."):
            continue
        k = k[len("matcher.") :]
        for i in range(n_layers):
            for att in ("self_attn", "cross_attn"):
                if k.startswith(f"{att}.{i}."):
                    k = f"transformers.{i}.{att}." + k[len(f"{att}.{i}.") :]
        out[k] = v
    return out


class LighterGlue(torch.nn.Module):
    """kornia's LightGlue in the XFeat configuration with the shipped weights, strictly loaded
    (only ``confidence_thresholds``, computed from the config, is not in the file)."""

    def __init__(self, weights: str | Path | None = None, filter_threshold: float = 0.1, pretrained: bool = True):
        super().__init__()
        import kornia.feature as KF

        conf = dict(LIGHTERGLUE_CONF, filter_threshold=float(filter_threshold))
        self.net = KF.LightGlue(None, **conf)  # type: ignore[arg-type]
        self.weights_sha256 = ""
        if pretrained:
            path = resolve_weights(LIGHTERGLUE_FILE, weights, "XFeat LighterGlue")
            sd = lighterglue_state(read_weights(path), path, conf["n_layers"])
            strict_load(self.net, sd, path, "LighterGlue", computed_buffers=("confidence_thresholds",))
            self.weights_sha256 = file_sha256(path)
        self.eval()

    @torch.inference_mode()
    def match(
        self,
        kpts1: np.ndarray,
        desc1: np.ndarray,
        size1: tuple[int, int],
        kpts2: np.ndarray,
        desc2: np.ndarray,
        size2: tuple[int, int],
    ) -> np.ndarray:
        """(P, 2) matched index pairs; ``size`` is (H, W) of the frame the keypoints are in."""
        if len(kpts1) == 0 or len(kpts2) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        dev = next(self.net.parameters()).device

        def side(k, d, s):
            return {
                "keypoints": torch.as_tensor(np.asarray(k, np.float32), device=dev)[None],
                "descriptors": torch.as_tensor(np.asarray(d, np.float32), device=dev)[None],
                "image_size": torch.tensor([[float(s[1]), float(s[0])]], device=dev),  # (W, H)
            }

        out = self.net({"image0": side(kpts1, desc1, size1), "image1": side(kpts2, desc2, size2)})
        return out["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)
