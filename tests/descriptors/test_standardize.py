"""Per-side descriptor standardisation (``--standardize center|zscore``): hand-derived values,
chunked == whole, memory-mapped sides, and the recall it adds on GardensPoint day -> night."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placerank.descriptors.standardize import center, column_stats, standardize, standardize_sides, zscore
from placerank.errors import PlaceRankError

pytestmark = pytest.mark.usefixtures("single_thread")


def test_center_by_hand():
    # rows (1, 0), (0, 1), (1, 1): mean (2/3, 2/3); centred (1/3, -2/3), (-2/3, 1/3), (1/3, 1/3)
    x = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    out, mean = center(x)
    np.testing.assert_allclose(mean, [2 / 3, 2 / 3], atol=1e-6)
    s5, s2 = 1 / np.sqrt(5), 1 / np.sqrt(2)
    np.testing.assert_allclose(out, [[s5, -2 * s5], [-2 * s5, s5], [s2, s2]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert out.dtype == np.float32
    # a given mean is used as it is (the other side's statistics are never mixed in by eval)
    out2, _ = center(x, mean=np.array([1, 0], np.float32))
    np.testing.assert_allclose(out2, [[0, 0], [-s2, s2], [0, 1]], atol=1e-6)  # a zero row stays zero


def test_zscore_by_hand():
    # dim 0: 0, 2, 4 -> mean 2, std sqrt(8/3); dim 1: 10, 10, 10 -> constant, divided by 1
    x = np.array([[0, 10], [2, 10], [4, 10]], np.float32)
    out, (mean, std) = zscore(x)
    np.testing.assert_allclose(mean, [2, 10], atol=1e-6)
    np.testing.assert_allclose(std, [np.sqrt(8 / 3), 0], atol=1e-6)
    np.testing.assert_allclose(out, [[-1, 0], [0, 0], [1, 0]], atol=1e-6)
    # scaling matters: dim 1 spread 100x wider than dim 0 -> both weigh the same after zscore
    y = np.array([[1, 100], [-1, -100], [1, -100], [-1, 100]], np.float32)
    np.testing.assert_allclose(np.abs(zscore(y)[0]), np.full((4, 2), 1 / np.sqrt(2)), atol=1e-6)


def test_chunked_equals_whole_and_memmap_sides(tmp_path):
    rng = np.random.default_rng(0)
    db = rng.normal(1.0, 1.0, (1001, 16)).astype(np.float32)
    q = rng.normal(-0.5, 2.0, (37, 16)).astype(np.float32)
    for mode in ("center", "zscore"):
        np.testing.assert_allclose(standardize(db, mode, chunk=7), standardize(db, mode), atol=1e-6)
    mean, std = column_stats(db, chunk=10)
    np.testing.assert_allclose(mean, db.astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(std, db.astype(np.float64).std(0), atol=1e-5)

    path = tmp_path / "db.npy"
    np.save(path, db)
    mapped = np.load(path, mmap_mode="r")
    got_db, got_q, info = standardize_sides(mapped, q, "center", tmp_path, chunk=100)
    assert isinstance(got_db, np.memmap) and not isinstance(got_q, np.memmap)  # written in the scratch folder
    assert (tmp_path / "database-center.npy").is_file()
    # each side with its own mean, never the other's
    np.testing.assert_allclose(got_db, center(db)[0], atol=1e-6)
    np.testing.assert_allclose(got_q, center(q)[0], atol=1e-6)
    assert info["mode"] == "center" and "transductive" in info["statistics"]
    same_db, same_q, _ = standardize_sides(db, q, "none", tmp_path)
    assert same_db is db and same_q is q


def test_bad_input():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(PlaceRankError, match="one of none, center, zscore"):
        standardize(x, "whiten")
    with pytest.raises(PlaceRankError, match="at least 2 rows"):
        center(x[:1])


def test_gardens_day_to_night_center_raises_recall(tmp_path, gardens, make_model):
    """All 140 frames, |i-j| <= 2, default model at 96x160, L = 5. Measured: single frame R@1
    0.450 -> 0.479 centred, L = 5 0.700 -> 0.821 (zscore 0.486 / 0.786)."""
    from placerank.eval.evaluate import EvalConfig, evaluate

    model = make_model(image_size=(96, 160))
    runs = {}
    for mode in ("none", "center"):
        cfg = EvalConfig(
            database=gardens / "day_left",
            queries=gardens / "night_right",
            frame_tolerance=2,
            out=tmp_path / mode,
            sequence_length=5,
            num_examples=0,
            standardize=mode,
        )
        runs[mode] = evaluate(cfg, model=model)
    none, centred = runs["none"], runs["center"]
    assert centred.recall_first_stage["1"] >= none.recall_first_stage["1"] >= 0.40
    assert centred.recall["1"] >= none.recall["1"] + 0.08 and centred.recall["1"] >= 0.78
    saved = json.loads((tmp_path / "center" / "results.json").read_text())
    assert saved["model"]["standardize"]["mode"] == "center"
    assert json.loads((tmp_path / "none" / "results.json").read_text())["model"]["standardize"] == {"mode": "none"}
    with pytest.raises(PlaceRankError, match="standardize must be one of"):
        evaluate(EvalConfig(database=gardens / "day_left", queries=gardens / "night_right", standardize="x"))
