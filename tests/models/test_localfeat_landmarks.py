"""Pretrained local features on real landmark photos: same-place pairs must verify with many
more MAGSAC inliers than pairs of different places, for each of XFeat, ALIKED-n16 and DISK.

Pairs: three Sacre-Coeur views (hloc) and the LightGlue building pair are the same-place pairs;
Sacre-Coeur x building are the different-place pairs. Measured (longest side 640 for XFeat, 512
for ALIKED/DISK, which keeps the test fast and their margin is wide there):
XFeat same 156/146/580 vs different 33..63; ALIKED (top-2048 maxima) same 309/210/870 vs
42..60; DISK same 333/192/892 vs 11..18. Random F-matrix inliers among ~400 wrong putative
matches sit at 10..60, hence the ratio floors below rather than a fixed count.
"""

from __future__ import annotations

import numpy as np
import pytest

from placerank.rerank.base import create_reranker

IMAGES = {
    "m1": "sacre_coeur/mapping/02928139_3448003521.jpg",
    "m2": "sacre_coeur/mapping/03903474_1471484089.jpg",
    "m3": "sacre_coeur/mapping/10265353_3838484249.jpg",
    "b0": "building_pair/DSC_0410.JPG",
    "b1": "building_pair/DSC_0411.JPG",
}
SAME = [("m1", "m2"), ("m2", "m3"), ("b0", "b1")]
DIFF = [("m1", "b0"), ("m1", "b1"), ("m2", "b0"), ("m3", "b1")]
SIDE = {"xfeat": 640, "aliked": 512, "disk": 512}
# min(same) / max(diff) and median ratio floors, about half of what was measured.
FLOORS = {"xfeat": (1.3, 2.0), "aliked": (2.0, 3.0), "disk": (5.0, 8.0)}


@pytest.mark.parametrize("kind", ["xfeat", "aliked", "disk"])
def test_same_place_pairs_get_many_more_inliers(kind, shared_data):
    root = shared_data / "landmark_multiview"
    rr = create_reranker(f"ransac-{kind}", image_size=(SIDE[kind], SIDE[kind]))
    feats = {k: rr.extract_path(root / v) for k, v in IMAGES.items()}
    for k, lf in feats.items():
        h, w = lf.image_size
        assert 200 < len(lf) <= 2048
        assert lf.descriptors.shape == (len(lf), rr.dim)
        np.testing.assert_allclose(np.linalg.norm(lf.descriptors, axis=1), 1.0, atol=1e-4)
        # keypoints are in original pixels (these photos are ~1000 px, the network saw <= 640)
        assert lf.keypoints[:, 0].min() >= -0.5 and lf.keypoints[:, 0].max() <= w - 0.5
        assert lf.keypoints[:, 1].min() >= -0.5 and lf.keypoints[:, 1].max() <= h - 0.5
        assert lf.keypoints[:, 0].max() > 0.6 * w and lf.keypoints[:, 1].max() > 0.6 * h
    same = [len(rr.matches(feats[a], feats[b])) for a, b in SAME]
    diff = [len(rr.matches(feats[a], feats[b])) for a, b in DIFF]
    min_ratio, med_ratio = FLOORS[kind]
    assert min(same) > min_ratio * max(diff), (kind, same, diff)
    assert np.median(same) > med_ratio * np.median(diff), (kind, same, diff)
    # scoring = inlier count per candidate, in candidate order
    scores = rr.score(feats["m1"], [feats["b0"], feats["m2"]])
    assert scores.tolist() == [float(len(rr.matches(feats["m1"], feats[c]))) for c in ("b0", "m2")]
    assert scores[1] > scores[0]


def test_lighterglue_matches_same_place_and_rejects_different(shared_data):
    """XFeat + LighterGlue, 1024 keypoints at 640 px (measured: m1-m2 178 inliers; m1-b0 31
    putative matches, 17 inliers, where mutual NN gives ~400 putative matches): the learned
    matcher removes most chance matches before RANSAC sees them."""
    root = shared_data / "landmark_multiview"
    rr = create_reranker("ransac-xfeat-lighterglue", image_size=(640, 640), max_keypoints=1024)
    f = {k: rr.extract_path(root / IMAGES[k]) for k in ("m1", "m2", "b0")}
    same = len(rr.matches(f["m1"], f["m2"]))
    diff = len(rr.matches(f["m1"], f["b0"]))
    assert same > 100 and diff < 40 and same > 4 * diff, (same, diff)
    assert len(rr.putative(f["m1"], f["b0"])) < 100
