"""The whole pipeline on real GardensPoint images: Recall@N, reports, cache, resume, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import placerank.descriptors.extract as extract_mod
from placerank.eval.evaluate import EvalConfig, evaluate
from placerank.eval.recall import recall_at_n


@pytest.fixture(scope="module")
def full_eval(tmp_path_factory, gardens):
    """GardensPoint day_right -> night_right, all 140 frames, default model at 640x360."""
    import os

    out = tmp_path_factory.mktemp("eval_full")
    os.environ["PLACERANK_CACHE"] = str(out / "cache")
    result = evaluate(
        EvalConfig(database=gardens / "day_right", queries=gardens / "night_right", frame_tolerance=2, out=out / "run")
    )
    return result, out / "run"


def test_recall_floor_day_to_night(full_eval):
    result, _ = full_eval
    # Measured 0.693 / 0.900 (R@1 / R@5) with EfficientNet-Lite0 + GeM at 640x360; chance is ~0.03.
    assert result.recall["1"] >= 0.60
    assert result.recall["5"] >= 0.82
    assert result.num_queries == result.num_database == 140


def test_results_json_and_pictures(full_eval):
    _, out = full_eval
    data = json.loads((out / "results.json").read_text())
    assert set(data["recall"]) >= {"1", "5", "10"} and data["num_queries"] == 140 and data["num_database"] == 140
    assert set(data["timing_s"]) >= {"extract", "search", "rerank"} and data["peak_memory_mb"] > 0
    assert data["model"]["name"] == "effnet-lite0-gem" and data["dataset"]["rule"] == "|i-j| <= 2"
    with Image.open(out / "recall_curve.png") as im:
        assert im.size[0] > 300
    examples = sorted((out / "examples").glob("query_*.png"))
    assert len(examples) == 8
    with Image.open(examples[0]) as im:
        assert im.size[0] > 5 * im.size[1] // 2  # query + 5 candidates side by side
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 140
    assert np.mean([int(r["correct_at_1"]) for r in rows]) == pytest.approx(data["recall"]["1"])


def test_second_run_extracts_nothing(frames_csv, tmp_path, gardens, monkeypatch):
    db = frames_csv(tmp_path / "db.csv", gardens / "day_right", range(0, 20))
    q = frames_csv(tmp_path / "q.csv", gardens / "night_right", range(0, 20))
    cfg = EvalConfig(
        database=db, queries=q, frame_tolerance=2, out=tmp_path / "a", image_size=(180, 320), num_examples=0
    )
    first = evaluate(cfg)

    def no_loader(*a, **k):
        raise AssertionError("second run must not decode any image")

    monkeypatch.setattr(extract_mod, "make_loader", no_loader)
    second = evaluate(EvalConfig(**{**cfg.__dict__, "out": tmp_path / "b"}))
    assert second.recall == first.recall


def test_interrupted_extraction_resumes(tmp_path, gardens):
    import torch

    from placerank.models import create

    model = create("effnet-lite0-gem", image_size=(96, 160)).eval()
    paths = sorted((gardens / "day_left").glob("*.jpg"))[:24]
    calls = {"n": 0}
    original = model.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(x)

    model.forward = flaky
    with pytest.raises(KeyboardInterrupt):
        extract_mod.extract_global(model, paths, torch.device("cpu"), batch_size=8, num_workers=0)
    seen = []
    model.forward = lambda x: (seen.append(len(x)), original(x))[1]
    resumed = extract_mod.extract_global(model, paths, torch.device("cpu"), batch_size=8, num_workers=0)
    assert sum(seen) == 16  # the first batch of 8 was committed before the interruption
    fresh = extract_mod.extract_global(model, paths, torch.device("cpu"), batch_size=8, num_workers=0, use_cache=False)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_changed_image_is_re_extracted(tmp_path, gardens):
    import shutil

    import torch

    from placerank.models import create

    model = create("effnet-lite0-gem", image_size=(96, 160)).eval()
    img = tmp_path / "a.jpg"
    shutil.copy(gardens / "day_left" / "Image000.jpg", img)
    a = extract_mod.extract_global(model, [img], torch.device("cpu"), num_workers=0)
    shutil.copy(gardens / "day_left" / "Image100.jpg", img)
    b = extract_mod.extract_global(model, [img], torch.device("cpu"), num_workers=0)
    assert float(a[0] @ b[0]) < 0.99


def test_recall_at_n_hand_checked():
    preds = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1]])
    pos = [np.array([1]), np.array([0]), np.array([], dtype=np.int64)]
    r = recall_at_n(preds, pos, ns=(1, 2, 3, 5))
    assert r == {"1": 0.5, "2": 1.0, "3": 1.0}


# ---- the CLI: exit codes and one-line errors ----------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "placerank.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_cli_corrupt_image_is_one_line_error(tmp_path, gardens):
    db = tmp_path / "db"
    db.mkdir()
    import shutil

    for k in range(3):
        shutil.copy(gardens / "day_right" / f"Image{k:03d}.jpg", db / f"Image{k:03d}.jpg")
    (db / "Image003.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("precious")
    r = _cli(
        "eval", "--database", db, "--queries", db, "--frame-tolerance", "1", "--out", out, "--image-size", "64", "96"
    )
    assert r.returncode == 2
    lines = [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]
    assert lines == [
        f"placerank: error: {db / 'Image003.jpg'}: cannot read image (UnidentifiedImageError: "
        f"cannot identify image file '{db / 'Image003.jpg'}')"
    ]
    assert (out / "results.json").read_text() == "precious"  # nothing written over the user's files


def test_cli_missing_folder_and_mismatched_weights(tmp_path, gardens, shared_weights):
    r = _cli("eval", "--database", tmp_path / "nope", "--queries", gardens / "night_right", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip() == f"placerank: error: {tmp_path / 'nope'}: folder does not exist"
    r = _cli(
        "eval",
        "--database",
        gardens / "day_right",
        "--queries",
        gardens / "night_right",
        "--weights",
        shared_weights / "disk-depth-save.pth",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2
    err = r.stderr.strip()  # one line naming the file and the network it does not fit
    assert err.startswith(f"placerank: error: {shared_weights / 'disk-depth-save.pth'}: ") and "\n" not in err
    assert "tf_efficientnet_lite0" in err
    assert not (tmp_path / "o").exists()
