"""Spatial-verification re-ranking: the classic baseline every learned re-ranker is compared to.

For each top-K candidate: putative matches between the query's and the candidate's local
features (mutual nearest neighbours, or LighterGlue for XFeat), then a fundamental matrix (or
homography) estimated with OpenCV's USAC/MAGSAC; the score is the number of inliers. Ties keep
the first-stage order (:func:`placerank.rerank.base.rerank_order`).

Registered re-rankers: ``ransac-xfeat``, ``ransac-aliked``, ``ransac-disk`` (MNN + MAGSAC) and
``ransac-xfeat-lighterglue``. Options (``EvalConfig.rerank_options`` or keyword arguments):
``image_size`` (H, W) of the fixed network input, or '360x640' from the CLI (default 480x640:
eval batches images, so the size must be fixed; keypoints are mapped back to original pixels), ``max_keypoints`` (2048),
``geometry`` ('fundamental' | 'homography'), ``threshold_px`` (1.0, in a frame whose longest side
is 640 px), ``confidence``, ``max_iters``, ``weights`` / ``matcher_weights`` (file paths),
``device``, ``precision`` ('auto' | 'fp32' | 'bf16' | 'fp16': the feature network's dense CNN
under autocast; 'auto' is :data:`AUTO_PRECISION`, the measured choice per network and device),
``workers`` (threads verifying a query's candidates at once; 0 = torch's thread count). OpenCV's
USAC runs one estimation on one core and releases the GIL, so a query's K candidates verify in
parallel; each estimation seeds its own generator, so the inlier counts do not depend on it.
The network runs channels_last in inference mode (:meth:`LocalFeatureNet.extract`); a reduced
precision is part of :meth:`RansacReranker.signature`, so its features get their own store.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from placerank.data.images import Preprocess, load_tensor
from placerank.descriptors.fast import check_precision
from placerank.errors import PlaceRankError
from placerank.models.base import LocalFeatures
from placerank.models.localfeat.base import create_features, to_original_pixels
from placerank.rerank.base import Bound, Reranker, check_option_ranges, register_reranker
from placerank.rerank.matching import LighterGlue, VerifyConfig, verify_pairs
from placerank.rerank.mutual_nn import mutual_nn_pairs

# The networks take RGB in [0, 1]: no mean/std normalisation (XFeat instance-normalises inside).
# Images smaller than 32 px per side have no 8x8-cell / stride-32 structure left to detect on.
LOCAL_MEAN = (0.0, 0.0, 0.0)
LOCAL_STD = (1.0, 1.0, 1.0)
LOCAL_MIN_SIDE = 32
DEFAULT_SIZE = (480, 640)
#: ``precision=auto`` per (network, device type); anything not listed runs fp32. Measured
#: (``benchmarks/local_extraction.py``, docs/inference.md): bf16 is 1.15x / 1.3x faster than fp32
#: channels_last for XFeat / ALIKED on CPU and kept the re-ranked R@1 on 40 GardensPoint queries,
#: but on all 140 night -> day queries of the demo XFeat bf16 lost one (92.9 against 93.6: more
#: than the 0.5 points ``--precision auto`` allows), so XFeat stays fp32; ALIKED was measured on
#: 24 queries only. DISK's bf16 descriptors drift (cosine down to 0.85); nothing on CUDA was
#: measured. (Before any entry is added, ``auto`` must resolve to the precision an existing localize
#: database stored its features in, or every old database would re-extract them.)
AUTO_PRECISION: dict[tuple[str, str], str] = {}


def resolve_local_precision(requested: str, features: str, device: torch.device | str) -> str:
    """The concrete precision of ``features``' network on ``device``: 'auto' -> the measured
    :data:`AUTO_PRECISION`; fp16 off CUDA is one line (the wording ``--precision`` uses)."""
    device = torch.device(device)
    if requested == "auto":
        return AUTO_PRECISION.get((features, device.type), "fp32")
    return check_precision(requested, device)


def _size(v) -> tuple[int, int]:
    """(H, W) from an int, a pair, or a CLI string such as '360x640' / '360,640'."""
    given = v
    if isinstance(v, int):
        v = (v, v)
    if isinstance(v, str):
        v = v.lower().replace("x", ",").split(",")
    try:
        t = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise PlaceRankError(f"image_size must be HEIGHT WIDTH (e.g. 360x640), got {given!r}") from None
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2 or min(t) < LOCAL_MIN_SIDE:
        raise PlaceRankError(f"image_size must be HEIGHT WIDTH with both >= {LOCAL_MIN_SIDE} px, got {t}")
    return t


@dataclass(frozen=True)
class RansacConfig:
    features: str = "xfeat"
    matcher: str = "mnn"  # "mnn" | "lighterglue"
    max_keypoints: int = 2048
    image_size: tuple[int, int] = DEFAULT_SIZE
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    weights: str | None = None
    matcher_weights: str | None = None
    precision: str = "auto"  # 'auto' is resolved for the device in RansacReranker.to
    workers: int = 0  # verification threads; 0 = torch.get_num_threads()


class RansacReranker(Reranker):
    """Local features + putative matches + MAGSAC; score = inlier count."""

    def __init__(self, config: RansacConfig = RansacConfig(), device: str | torch.device = "cpu"):
        if config.matcher not in ("mnn", "lighterglue"):
            raise PlaceRankError(f"unknown matcher '{config.matcher}': use mnn or lighterglue")
        if config.matcher == "lighterglue" and config.features != "xfeat":
            raise PlaceRankError("LighterGlue matches XFeat features only (use --features xfeat)")
        if config.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise PlaceRankError(f"precision {config.precision!r}: use one of auto, fp32, bf16, fp16")
        self.config = config
        self.name = f"ransac-{config.features}" + ("-lighterglue" if config.matcher == "lighterglue" else "")
        self.net = create_features(config.features, weights=config.weights, max_keypoints=config.max_keypoints)
        self.precision = "fp32"  # the concrete one, set by .to(device); read by local_precision
        self.dim = self.net.dim
        size = (int(config.image_size[0]), int(config.image_size[1]))
        self.preprocess = Preprocess(size, LOCAL_MEAN, LOCAL_STD, min_side=LOCAL_MIN_SIDE)
        self.glue = LighterGlue(config.matcher_weights) if config.matcher == "lighterglue" else None
        self.device = torch.device("cpu")
        self.to(device)

    def signature(self) -> str:
        """Stored features depend on the network, its weights, the keypoint budget and the input
        size, and (unless fp32, so existing stores stay valid) the precision; the matcher and
        RANSAC settings only affect scoring, so they are not part of it."""
        precision = f":{self.precision}" if self.precision != "fp32" else ""
        return (
            f"{self.name}:{self.net.kind}-{self.net.config_id()}:w{self.net.weights_sha256[:12]}:"
            f"k{self.config.max_keypoints}:{self.preprocess.signature()}{precision}"
        )

    def to(self, device) -> RansacReranker:
        """Move to ``device`` (channels_last weights); 'auto' precision is resolved for it."""
        self.device = torch.device(device)
        self.precision = resolve_local_precision(self.config.precision, self.config.features, self.device)
        self.net.set_precision(self.precision)
        self.net.to(self.device).to(memory_format=torch.channels_last)
        if self.glue is not None:
            self.glue.to(self.device)
        return self

    # -- extraction -----------------------------------------------------------------------------
    @torch.inference_mode()
    def extract(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]]) -> list[LocalFeatures]:
        raw = self.net.extract(images)  # channels_last float32 on the network's device
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        out = []
        for r, orig in zip(raw, original_sizes):
            orig = (int(orig[0]), int(orig[1]))
            kp = r.keypoints.cpu().numpy().astype(np.float32)
            out.append(
                LocalFeatures(
                    keypoints=to_original_pixels(kp, hw, orig),
                    descriptors=r.descriptors.cpu().numpy().astype(np.float32),
                    scores=r.scores.cpu().numpy().astype(np.float32),
                    image_size=orig,
                )
            )
        return out

    def extract_path(self, path: str | Path, keep_aspect: bool = True) -> LocalFeatures:
        """Features of one image file. ``keep_aspect``: resize to longest side = max(image_size),
        sides rounded to multiples of 32, instead of the fixed batch size (for single pairs)."""
        pre = self.preprocess
        if keep_aspect:
            from placerank.data.images import open_image

            im = open_image(path, LOCAL_MIN_SIDE)
            W, H = im.size
            side = max(self.preprocess.size)
            s = side / max(H, W)
            size = (max(32, int(round(H * s / 32)) * 32), max(32, int(round(W * s / 32)) * 32))
            pre = self.preprocess.with_size(size)
        t, orig = load_tensor(path, pre)
        return self.extract(t[None], [orig])[0]

    # -- scoring ----------------------------------------------------------------------------------
    def putative(self, query: LocalFeatures, cand: LocalFeatures) -> np.ndarray:
        if self.glue is not None:
            return self.glue.match(
                query.keypoints, query.descriptors, query.image_size, cand.keypoints, cand.descriptors, cand.image_size
            )
        return mutual_nn_pairs(query.descriptors, cand.descriptors, self.device)

    def matches(self, query: LocalFeatures, cand: LocalFeatures) -> np.ndarray:
        """(P, 2) verified (query_idx, cand_idx) inlier pairs."""
        pairs = self.putative(query, cand)
        inl = verify_pairs(
            query.keypoints, cand.keypoints, pairs, query.image_size, cand.image_size, self.config.verify
        )
        return pairs[inl]

    def score(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> np.ndarray:
        """Inlier count per candidate. The putative matches (torch, already multi-threaded) are
        found one candidate at a time; the RANSAC estimations, single-threaded in OpenCV and
        most of the re-ranking time, run ``workers`` at once."""
        pairs = [self.putative(query, c) for c in candidates]

        def inliers(i: int) -> int:
            c = candidates[i]
            mask = verify_pairs(
                query.keypoints, c.keypoints, pairs[i], query.image_size, c.image_size, self.config.verify
            )
            return int(mask.sum())

        workers = min(self.config.workers or torch.get_num_threads(), len(candidates))
        if workers <= 1:
            return np.array([inliers(i) for i in range(len(candidates))], dtype=np.float64)
        with ThreadPoolExecutor(workers, thread_name_prefix="ransac") as pool:
            return np.array(list(pool.map(inliers, range(len(candidates)))), dtype=np.float64)


def _make(features: str, matcher: str = "mnn", **kw) -> RansacReranker:
    device = kw.pop("device", "cpu")
    verify_keys = {"geometry", "threshold_px", "confidence", "max_iters", "min_matches"}
    vkw = {k: kw.pop(k) for k in list(kw) if k in verify_keys}
    unknown = set(kw) - {"image_size", "max_keypoints", "weights", "matcher_weights", "precision", "workers"}
    if unknown:
        raise PlaceRankError(f"unknown option(s) for ransac re-ranking: {', '.join(sorted(unknown))}")
    verify = VerifyConfig()
    if "geometry" in vkw and "min_matches" not in vkw:
        vkw["min_matches"] = 8 if vkw["geometry"] == "fundamental" else 4
    verify = replace(verify, **vkw)
    cfg = RansacConfig(
        features=features,
        matcher=matcher,
        max_keypoints=int(kw.get("max_keypoints", 2048)),
        image_size=_size(kw["image_size"]) if kw.get("image_size") is not None else DEFAULT_SIZE,
        verify=verify,
        weights=kw.get("weights"),
        matcher_weights=kw.get("matcher_weights"),
        precision=str(kw.get("precision", "auto")),
        workers=int(kw.get("workers", 0)),
    )
    return RansacReranker(cfg, device=device)


# the allowed range of the numeric options (min_matches: at least 8 for a fundamental matrix, 4
# for a homography, checked by VerifyConfig)
BOUNDS = {
    "max_keypoints": Bound(1, whole=True),
    "threshold_px": Bound(0.0, open_low=True),
    "confidence": Bound(0.0, 1.0, open_low=True),
    "max_iters": Bound(1, whole=True),
    "min_matches": Bound(0, whole=True),
    "workers": Bound(0, whole=True),
}


def _factory(features: str, matcher: str = "mnn"):
    """A registered factory whose keyword parameters are the typed ``--rerank-option`` keys;
    ``**unknown`` keeps the one-line error for a key it does not take."""

    def factory(
        image_size: tuple[int, int] | str | None = None,
        max_keypoints: int = 2048,
        geometry: str = "fundamental",
        threshold_px: float = 1.0,
        confidence: float = 0.999,
        max_iters: int = 10000,
        min_matches: int | None = None,
        weights: str | None = None,
        matcher_weights: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        workers: int = 0,
        **unknown,
    ) -> RansacReranker:
        kw: dict[str, Any] = dict(
            image_size=image_size,
            max_keypoints=max_keypoints,
            weights=weights,
            matcher_weights=matcher_weights,
            precision=precision,
            workers=workers,
        )
        kw.update(geometry=geometry, threshold_px=threshold_px, confidence=confidence, max_iters=max_iters)
        if min_matches is not None:
            kw["min_matches"] = min_matches
        check_option_ranges(f"ransac-{features}" + ("-lighterglue" if matcher == "lighterglue" else ""), kw, BOUNDS)
        return _make(features, matcher, device=device, **kw, **unknown)

    return factory


ransac_xfeat = register_reranker(
    "ransac-xfeat", "XFeat + mutual NN + MAGSAC fundamental matrix; score = inliers", bounds=BOUNDS
)(_factory("xfeat"))
ransac_aliked = register_reranker(
    "ransac-aliked", "ALIKED-n16 + mutual NN + MAGSAC fundamental matrix; score = inliers", bounds=BOUNDS
)(_factory("aliked"))
ransac_disk = register_reranker(
    "ransac-disk", "DISK + mutual NN + MAGSAC fundamental matrix; score = inliers", bounds=BOUNDS
)(_factory("disk"))
ransac_xfeat_lighterglue = register_reranker(
    "ransac-xfeat-lighterglue", "XFeat + LighterGlue matches + MAGSAC; score = inliers", bounds=BOUNDS
)(_factory("xfeat", matcher="lighterglue"))
