"""``placerank extract`` -> ``search`` -> ``rerank`` on real GardensPoint frames: the same
ranking as ``placerank eval``, reruns skip finished work, bad files are one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import placerank.descriptors.extract as extract_mod
from placerank.cli import main
from placerank.index.candidates import load_candidates

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = ["96", "160"]
RANSAC = ["--rerank-option", "image_size=128x224", "--rerank-option", "max_keypoints=256"]


def _error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def stages(frames_csv, tmp_path_factory, gardens):
    """Three stage commands and one eval on the same 24 + 24 frames (own cache)."""
    import os

    tmp = tmp_path_factory.mktemp("stages")
    old = os.environ.get("PLACERANK_CACHE")
    os.environ["PLACERANK_CACHE"] = str(tmp / "cache")
    try:
        db = frames_csv(tmp / "db.csv", gardens / "day_right", range(0, 48, 2))
        q = frames_csv(tmp / "q.csv", gardens / "night_right", range(1, 48, 2))
        common = ["--image-size", *SIZE, "--workers", "0"]
        assert main(["extract", "--images", str(db), "--out", str(tmp / "db"), *common]) == 0
        assert main(["extract", "--images", str(q), "--out", str(tmp / "q"), *common]) == 0
        assert (
            main(["search", "--database", str(tmp / "db"), "--queries", str(tmp / "q"), "--out", str(tmp / "c")]) == 0
        )
        rr = ["--rerank", "ransac-xfeat", "--top-k", "5", *RANSAC, "--workers", "0"]
        assert main(["rerank", "--candidates", str(tmp / "c"), "--out", str(tmp / "r"), *rr]) == 0
        ev = ["eval", "--database", str(db), "--queries", str(q), "--frame-tolerance", "2", "--examples", "0"]
        assert main([*ev, *common, *rr, "--out", str(tmp / "eval")]) == 0
    finally:
        if old is None:
            os.environ.pop("PLACERANK_CACHE", None)
        else:
            os.environ["PLACERANK_CACHE"] = old
    return tmp


def test_three_commands_give_the_ranking_of_eval(stages):
    searched, reranked = load_candidates(stages / "c"), load_candidates(stages / "r")
    assert searched.ids.shape == (24, 24) and searched.rerank is None
    assert reranked.rerank["name"] == "ransac-xfeat" and reranked.rerank["top_k"] == 5
    assert (reranked.ids[:, 5:] == searched.ids[:, 5:]).all()  # past top-K: first-stage order
    assert (np.sort(reranked.ids[:, :5], 1) == np.sort(searched.ids[:, :5], 1)).all()
    assert not (reranked.ids[:, :5] == searched.ids[:, :5]).all()  # the re-ranker moved something
    rows = list(csv.DictReader(open(stages / "eval" / "predictions.csv")))
    eval_top5 = [r["top5"].split(" ") for r in rows]
    assert eval_top5 == [[reranked.database_paths[j] for j in row[:5]] for row in reranked.ids]
    result = json.loads((stages / "eval" / "results.json").read_text())
    assert set(result["timing_s"]) >= {"extract", "search", "extract_local", "rerank"}
    # the stored similarities follow their candidates
    sim = {(q, int(j)): s for q in range(24) for j, s in zip(searched.ids[q], searched.similarities[q])}
    assert all(sim[(q, int(j))] == s for q in range(24) for j, s in zip(reranked.ids[q], reranked.similarities[q]))


def test_reruns_skip_finished_work(stages, monkeypatch, capsys, gardens):
    def no_loader(*a, **k):
        raise AssertionError("a rerun must not decode any image")

    monkeypatch.setattr(extract_mod, "make_loader", no_loader)
    capsys.readouterr()
    db = stages / "db.csv"
    assert main(["extract", "--images", str(db), "--out", str(stages / "db"), "--image-size", *SIZE]) == 0
    assert (
        main(["search", "--database", str(stages / "db"), "--queries", str(stages / "q"), "--out", str(stages / "c")])
        == 0
    )
    rr = ["--rerank", "ransac-xfeat", "--top-k", "5", *RANSAC]
    assert main(["rerank", "--candidates", str(stages / "c"), "--out", str(stages / "r"), *rr]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{stages / 'db'}: up to date, 24 images x 1280-d (effnet-lite0-gem)",
        f"{stages / 'c'}: up to date, top-24 of 24 database images for 24 queries",
        f"{stages / 'r'}: up to date, top-5 of 24 queries re-ranked by ransac-xfeat",
    ]


def test_bad_and_mismatched_files_are_one_line_errors(stages, tmp_path, capsys):
    import shutil

    bad = tmp_path / "db"
    shutil.copytree(stages / "db", bad)
    np.save(bad / "descriptors.npy", np.zeros((3, 1280), np.float32))
    assert main(["search", "--database", str(bad), "--queries", str(stages / "q"), "--out", str(tmp_path / "c")]) == 2
    assert _error(capsys) == (
        f"placerank: error: {bad}: not a usable descriptor folder (descriptors.npy is float32 (3, 1280), "
        "descriptors.json says float32 (24, 1280)); rerun `placerank extract`"
    )
    assert not (tmp_path / "c").exists()
    (bad / "descriptors.json").write_text("{")
    assert main(["search", "--database", str(bad), "--queries", str(stages / "q"), "--out", str(tmp_path / "c")]) == 2
    assert _error(capsys).startswith(
        f"placerank: error: {bad}: not a usable descriptor folder (descriptors.json is not JSON"
    )
    # candidates whose arrays come from another run
    mixed = tmp_path / "mixed"
    shutil.copytree(stages / "c", mixed)
    shutil.copy(stages / "r" / "candidates.npz", mixed / "candidates.npz")
    assert main(["rerank", "--candidates", str(mixed), "--rerank", "ransac-xfeat", "--out", str(tmp_path / "r")]) == 2
    assert _error(capsys) == (
        f"placerank: error: {mixed}: not a usable candidates folder "
        "(candidates.npz does not belong to candidates.json (hash differs))"
    )
    # re-ranking already re-ranked candidates
    assert (
        main(["rerank", "--candidates", str(stages / "r"), "--rerank", "ransac-xfeat", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "were already re-ranked by ransac-xfeat" in _error(capsys)


def test_descriptors_of_other_models_are_not_searched_together(stages, tmp_path, capsys):
    q = stages / "q.csv"
    assert main(["extract", "--images", str(q), "--out", str(tmp_path / "q"), "--image-size", "64", "96"]) == 0
    capsys.readouterr()
    assert (
        main(
            ["search", "--database", str(stages / "db"), "--queries", str(tmp_path / "q"), "--out", str(tmp_path / "c")]
        )
        == 2
    )
    w = load_candidates(stages / "c").weights_id
    assert _error(capsys) == (
        f"placerank: error: database descriptors are effnet-lite0-gem (weights {w}, input 96x160) but query "
        f"descriptors are effnet-lite0-gem (weights {w}, input 64x96): extract both with the same model, weights "
        "and input size"
    )
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["thresold=0.5"],
            "unknown fol-region option 'thresold'; known: chunk, min_matches, mode, num_regions, single_pair_zero, threshold",
        ),
        (["threshold=high"], "fol-region option threshold: expected a number, got 'high'"),
        (["chunk"], "--rerank-option expects KEY=VALUE, got 'chunk'"),
    ],
)
def test_rerank_options_are_typed_one_line_errors(options, message, tmp_path, capsys):
    args = ["eval", "--database", "nowhere", "--queries", "nowhere", "--out", str(tmp_path / "o")]
    args += ["--model", "fol-effnet-lite0", "--rerank", "fol-region"]
    for o in options:
        args += ["--rerank-option", o]
    assert main(args) == 2
    assert _error(capsys) == f"placerank: error: {message}"
    assert not (tmp_path / "o").exists()


def test_ransac_options_keep_their_types():
    from placerank.rerank.base import reranker_options

    got = reranker_options(
        "ransac-xfeat", ["image_size=360x640", "max_keypoints=512", "threshold_px=2", "weights=x.pt"]
    )
    assert got == {"image_size": "360x640", "max_keypoints": 512, "threshold_px": 2.0, "weights": "x.pt"}
    assert reranker_options("ransac-xfeat", {"image_size": (288, 512)}) == {"image_size": (288, 512)}
