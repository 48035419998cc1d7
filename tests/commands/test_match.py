"""``placerank match``: prints the inlier count, draws the inliers; bad inputs are one-line errors."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from PIL import Image

from placerank.cli import main
from placerank.errors import DataError, PlaceRankError
from placerank.rerank.base import create_reranker
from placerank.viz.matches import draw_matches


def test_match_prints_inliers_and_draws_them(shared_data, tmp_path, capsys):
    root = shared_data / "landmark_multiview" / "building_pair"
    out = tmp_path / "match.png"
    rc = main(
        [
            "match",
            str(root / "DSC_0410.JPG"),
            str(root / "DSC_0411.JPG"),
            "--features",
            "xfeat",
            "--longest-side",
            "480",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    m = re.search(r"^(\d+) inliers of (\d+) putative matches \(xfeat, (\d+) \+ (\d+) keypoints", text, re.M)
    assert m, text
    inliers, putative = int(m.group(1)), int(m.group(2))
    assert 150 < inliers <= putative  # same building, small viewpoint change: measured 620 of 1126 at 480 px
    pic = cv2.imread(str(out))
    # both 1024x682 photos scaled to 480 px high, side by side with an 8 px gap, a 30 px title band
    assert pic.shape == (480 + 30, 2 * round(1024 * 480 / 682) + 8, 3)
    # lines were drawn: the picture differs from the plain side-by-side images
    plain = tmp_path / "plain.png"
    draw_matches(
        root / "DSC_0410.JPG",
        root / "DSC_0411.JPG",
        np.zeros((0, 2)),
        np.zeros((0, 2)),
        np.zeros((0, 2), int),
        plain,
        title="x",
    )
    assert np.abs(cv2.imread(str(plain)).astype(int) - pic.astype(int)).sum(axis=2).astype(bool).mean() > 0.01


def _bad_images(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole JPEG")
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tiny)
    return corrupt, tiny


def test_corrupt_and_tiny_images_are_one_line_errors(shared_data, tmp_path, capsys):
    good = shared_data / "landmark_multiview" / "building_pair" / "DSC_0410.JPG"
    corrupt, tiny = _bad_images(tmp_path)
    rr = create_reranker("ransac-xfeat", image_size=(240, 320))
    with pytest.raises(DataError) as e:
        rr.extract_path(corrupt)
    assert str(e.value).startswith(f"{corrupt}: cannot read image (") and "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        rr.extract_path(tiny)
    assert str(e.value) == f"{tiny}: image is too small (24x20 px, need >= 32 px per side)"
    # the eval path (fixed-size batches) refuses them the same way
    from placerank.data.images import load_tensor

    with pytest.raises(DataError, match="image is too small"):
        load_tensor(tiny, rr.preprocess)

    for bad, expected in (
        (corrupt, f"{corrupt}: cannot read image ("),
        (tiny, f"{tiny}: image is too small (24x20 px, need >= 32 px per side)"),
    ):
        rc = main(["match", str(good), str(bad), "--longest-side", "320", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.startswith(f"placerank: error: {expected}") and err.count("\n") == 1

    rc = main(["match", str(good), str(good), "--features", "disk", "--matcher", "lighterglue"])
    assert rc == 2
    assert (
        capsys.readouterr().err == "placerank: error: LighterGlue matches XFeat features only (use --features xfeat)\n"
    )


def test_bad_options_are_one_line_errors():
    with pytest.raises(PlaceRankError) as e:
        create_reranker("ransac-xfeat", threshold=2.0)
    assert str(e.value) == "unknown option(s) for ransac re-ranking: threshold"
    with pytest.raises(PlaceRankError) as e:
        create_reranker("ransac-xfeat", geometry="affine")
    assert str(e.value) == "unknown geometry 'affine': use fundamental or homography"
    with pytest.raises(PlaceRankError) as e:
        create_reranker("ransac-xfeat", image_size=(16, 640))
    assert str(e.value) == "image_size must be HEIGHT WIDTH with both >= 32 px, got (16, 640)"
    with pytest.raises(PlaceRankError) as e:
        create_reranker("ransac-xfeat", image_size="wide")
    assert str(e.value) == "image_size must be HEIGHT WIDTH (e.g. 360x640), got 'wide'"
    # what `placerank eval --rerank-option image_size=360x640 --rerank-option max_keypoints=512` passes
    rr = create_reranker("ransac-xfeat", image_size="360x640", max_keypoints=512, threshold_px=2)
    assert rr.preprocess.size == (360, 640) and rr.net.max_keypoints == 512
    assert rr.config.verify.threshold_px == 2.0
