"""Pretrained local features (XFeat, ALIKED-n16, DISK) and geometric verification, used by the
RANSAC re-rankers (``ransac-xfeat`` ...) and ``placerank match``."""

from placerank.models.localfeat.base import (  # noqa: F401
    LocalFeatureNet,
    RawFeatures,
    create_features,
    feature_kinds,
    to_original_pixels,
)
