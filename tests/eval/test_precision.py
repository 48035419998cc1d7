"""Confidence and precision-recall: PR-AUC and Recall@100%Precision against hand-derived values,
scikit-learn and VPR_Tutorial's loop; eval on real GardensPoint frames writes them with
pr_curve.png; ``--rerank-below`` at its two extremes equals plain re-ranking / no re-ranking."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import auc, precision_recall_curve

from placerank.cli import main
from placerank.errors import PlaceRankError
from placerank.eval.confidence import combined_confidence, place_margin
from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.eval.precision import precision_recall

pytestmark = pytest.mark.usefixtures("single_thread")


def vpr_tutorial_pr(conf, correct, has):
    """VPR_Tutorial's createPR(matching="single") loop, its thresholds every distinct score."""
    gtp = has.sum()
    p, r = [1.0], [0.0]
    for t in np.unique(conf)[::-1]:
        accepted = conf >= t
        tp, fp = np.count_nonzero(correct & accepted), np.count_nonzero(~correct & accepted)
        p.append(tp / (tp + fp))
        r.append(tp / gtp)
    p, r = np.array(p), np.array(r)
    return p, r, float(np.trapezoid(p, r)), float(r[p == 1].max())


@pytest.mark.parametrize(
    "conf, correct, has, auc_hand, r100, t100",
    [
        # (0,1) (.25,1) (.5,1) (.5,2/3) (.75,3/4): 0.25 + 0.25 + 0 + (2/3+3/4)/2 * 0.25
        ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], [1, 1, 1, 1], 0.5 + 17 / 96, 0.5, 0.8),
        # a tie of a right and a wrong answer is accepted together: (0,1) (1/3,1/2) (2/3,2/3)
        ([0.9, 0.9, 0.5], [1, 0, 1], [1, 1, 1], 0.25 + 7 / 36, 0.0, None),
        # query 2 has no positive: wrong when accepted, not in the recall's denominator (GTP = 2)
        ([0.9, 0.8, 0.7], [1, 0, 1], [1, 0, 1], 0.5 + 7 / 24, 0.5, 0.9),
        ([0.3, 0.2], [0, 0], [1, 1], 0.0, 0.0, None),  # every answer wrong
        ([0.5, 0.5, 0.5], [1, 1, 1], [1, 1, 1], 1.0, 1.0, 0.5),  # all right, one tie
    ],
)
def test_hand_derived_cases(conf, correct, has, auc_hand, r100, t100):
    pr = precision_recall(conf, correct, has)
    assert pr.auc == pytest.approx(auc_hand, abs=1e-12)
    assert pr.recall_at_100_precision == pytest.approx(r100)
    assert pr.threshold_at_100_precision == (None if t100 is None else pytest.approx(t100))
    p, r, a, r100_loop = vpr_tutorial_pr(np.array(conf, float), np.array(correct, bool), np.array(has, bool))
    np.testing.assert_allclose(pr.precision, p)
    np.testing.assert_allclose(pr.recall, r)
    assert (pr.auc, pr.recall_at_100_precision) == (pytest.approx(a), pytest.approx(r100_loop))


def test_equals_scikit_learn_and_vpr_tutorial_on_random_scores():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        conf = rng.integers(0, 30, n) / 10.0  # many ties
        has = rng.random(n) < 0.9
        correct = has & (rng.random(n) < 0.3 + 0.02 * conf)
        if not correct.any():
            continue
        pr = precision_recall(conf, correct, has)
        p, r, _ = precision_recall_curve(correct.astype(int), conf)
        # scikit-learn's recall divides by the correct top-1s, VPR_Tutorial's by the queries with positives
        scale = correct.sum() / has.sum()
        np.testing.assert_allclose(pr.precision, p[::-1])
        np.testing.assert_allclose(pr.recall, r[::-1] * scale)
        assert pr.auc == pytest.approx(auc(r[::-1] * scale, p[::-1]))
        _, _, a, r100 = vpr_tutorial_pr(conf, correct, has)
        assert (pr.auc, pr.recall_at_100_precision) == (pytest.approx(a), pytest.approx(r100)), trial
        assert pr.recall[-1] == pytest.approx(correct.sum() / has.sum())  # ends at R@1


def test_no_query_with_positives_is_nan_and_bad_input_refused():
    pr = precision_recall([0.5, 0.1], [0, 0], [0, 0])
    assert math.isnan(pr.auc) and math.isnan(pr.recall_at_100_precision)
    with pytest.raises(ValueError, match="finite"):
        precision_recall([float("nan")], [1], [1])
    with pytest.raises(ValueError, match="without positives"):
        precision_recall([0.5], [1], [0])


def test_place_margin_skips_the_top1s_neighbours():
    sims = np.array([[0.9, 0.88, 0.7, 0.6], [0.8, 0.79, 0.78, 0.5]])
    ids = np.array([[5, 6, 40, 41], [3, 4, 2, -1]])
    same = np.array([[True, True, False, False], [True, True, True, False]])
    # query 0: best non-neighbour 0.7; query 1: every candidate the same place -> the last valid one
    np.testing.assert_allclose(place_margin(sims, ids, same), [0.2, 0.02])


def test_combined_confidence_ranks_skipped_queries_first():
    first = np.array([0.5, 0.1, 0.6, 0.2])
    rerank = np.array([0.0, 80.0, 0.0, 12.0])
    rerun = np.array([False, True, False, True])
    order = np.argsort(-combined_confidence(first, rerank, rerun), kind="stable")
    assert order.tolist() == [2, 0, 1, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gardens, frames_csv, make_model):
    """GardensPoint day_left -> night_right frames 0-57 (every 3rd), FoL at 144x256 + fol-region:
    plain re-ranking, --rerank-below above / below every confidence, and no re-ranking."""
    root = tmp_path_factory.mktemp("precision")
    frames = range(0, 60, 3)
    db = frames_csv(root / "db.csv", gardens / "day_left", frames)
    q = frames_csv(root / "q.csv", gardens / "night_right", frames)
    model = make_model("fol-effnet-lite0", image_size=(144, 256))
    base = dict(database=db, queries=q, frame_tolerance=2, num_examples=0, top_k=10)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_CACHE", str(root / "cache"))  # one cache: every run after the first extracts nothing
        for name, kw in {
            "plain": dict(rerank="fol-region"),
            "above": dict(rerank="fol-region", rerank_below=1e9),
            "below": dict(rerank="fol-region", rerank_below=0.0),
            "none": {},
        }.items():
            evaluate(EvalConfig(out=root / name, **base, **kw), model=model)
            out[name] = root / name
    return out


def _read(folder):
    return json.loads((folder / "results.json").read_text()), list(csv.DictReader(open(folder / "predictions.csv")))


def test_eval_writes_precision_recall_and_the_picture(runs):
    data, rows = _read(runs["plain"])
    for key in ("precision_recall", "precision_recall_first_stage"):
        pr = data[key]
        assert 0 < pr["auc"] <= 1 and 0 <= pr["recall_at_100_precision"] <= data["recall"]["1"] + 1e-9
        assert pr["confidence"] and "VPR_Tutorial" in pr["definition"]
    assert data["precision_recall"]["confidence"].startswith("fol-region score")
    assert data["precision_recall_first_stage"]["confidence"].startswith("place margin")
    # the numbers follow from predictions.csv's confidences and right/wrong flags
    has = np.ones(len(rows), bool)  # every frame here has a positive (|i-j| <= 2)
    again = precision_recall([float(r["confidence"]) for r in rows], [int(r["correct_at_1"]) for r in rows], has)
    assert data["precision_recall"]["auc"] == pytest.approx(again.auc, abs=1e-4)
    assert all(r["reranked"] == "1" for r in rows)
    # the first stage's threshold at 100% precision, read back, selects exactly its R@100%P queries
    first = data["precision_recall_first_stage"]
    confident = [r for r in rows if float(r["first_stage_confidence"]) >= first["threshold_at_100_precision"]]
    assert len(confident) == round(first["recall_at_100_precision"] * len(rows)) > 0
    with Image.open(runs["plain"] / "pr_curve.png") as im:
        assert im.size[0] > 300
    none, none_rows = _read(runs["none"])
    assert none["precision_recall"] == none["precision_recall_first_stage"]
    assert all(r["confidence"] == r["first_stage_confidence"] and r["reranked"] == "0" for r in none_rows)


def test_rerank_below_extremes(runs):
    plain, plain_rows = _read(runs["plain"])
    above, above_rows = _read(runs["above"])
    below, below_rows = _read(runs["below"])
    none, none_rows = _read(runs["none"])
    assert [r["top5"] for r in plain_rows] != [r["top5"] for r in none_rows]  # re-ranking moves candidates here
    # CONF above every confidence: every query re-ranked, exactly as without the option
    assert above["rerank"]["rerank_below"]["queries_reranked"] == 20
    assert above["recall"] == plain["recall"] and above["precision_recall"] == plain["precision_recall"]
    assert [r["top5"] for r in above_rows] == [r["top5"] for r in plain_rows]
    # CONF 0, below every (non-negative) place margin: nothing re-ranked, the global ranking kept
    assert below["rerank"]["rerank_below"]["queries_skipped"] == 20
    assert below["recall"] == below["recall_first_stage"] == none["recall"]
    assert [r["top5"] for r in below_rows] == [r["top5"] for r in none_rows]
    assert below["precision_recall"]["auc"] == none["precision_recall"]["auc"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--rerank", "fol-region", "--rerank-below", "nan"],
            "argument --rerank-below: must be a number >= 0, got 'nan'",
        ),
        (
            ["--rerank", "fol-region", "--rerank-below", "-1"],
            "argument --rerank-below: must be a number >= 0, got '-1'",
        ),
        (["--rerank-below", "0.02"], "rerank_below (--rerank-below) needs a re-ranker (--rerank NAME)"),
    ],
)
def test_bad_rerank_below_is_one_line(extra, message, tmp_path, gardens, capsys):
    args = ["eval", "--database", str(gardens / "day_left"), "--queries", str(gardens / "night_right")]
    code = None
    try:
        code = main([*args, "--frame-tolerance", "2", *extra, "--out", str(tmp_path / "o")])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("placerank: error: ") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_rerank_below_in_python_is_checked(tmp_path):
    cfg = EvalConfig(database="x", queries="y", rerank="fol-region", rerank_below=float("inf"), out=tmp_path / "o")
    with pytest.raises(PlaceRankError, match="finite number"):
        evaluate(cfg)
