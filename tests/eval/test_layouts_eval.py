"""eval on the benchmark-layout replicas (real images, synthetic coordinates): the MSLS replica,
the NetVLAD .mat replica and a CSV of the same images give identical Recall@N; an unlabelled pair
of folders gives predictions and pictures, no recall, and one line saying so."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from placerank.cli import main
from placerank.eval.evaluate import EvalConfig, evaluate

_spec = importlib.util.spec_from_file_location("layout_replicas", Path(__file__).parents[1] / "data" / "replicas.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = (96, 160)


def _eval(out: Path, model, **kw):
    return evaluate(EvalConfig(out=out, image_size=SIZE, num_examples=0, **kw), model=model)


def test_msls_mat_and_csv_give_identical_recall(tmp_path, gardens, make_model):
    model = make_model("effnet-lite0-gem", image_size=SIZE)
    db, q = R.places(gardens)
    city = R.build_msls(tmp_path / "msls", gardens)
    mat = R.build_mat_v5(tmp_path / "mat", gardens)
    db_csv, q_csv = R.build_csv(tmp_path / "csv", db, q)
    a = _eval(tmp_path / "a", model, database=city / "database", queries=city / "query")
    b = _eval(tmp_path / "b", model, dataset=mat)
    c = _eval(tmp_path / "c", model, database=db_csv, queries=q_csv)
    assert a.recall == b.recall == c.recall and set(a.recall) == {"1", "5", "10"}
    assert a.num_queries == a.num_queries_with_positives == 5  # MSLS drops the query without a positive
    assert b.num_queries == c.num_queries == 6 and b.num_queries_with_positives == 5
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["labelled"] is True and saved["dataset"]["protocol"]["layout"] == "msls"
    assert json.loads((tmp_path / "b" / "results.json").read_text())["dataset"]["protocol"]["radius_m"] == 25.0


def test_unlabelled_folders_predict_without_recall(tmp_path, gardens, capsys):
    """The VPR-methods-evaluation toy-set shape: database/db1..db17.jpg, queries/q1..q5.jpg."""
    db, q = tmp_path / "database", tmp_path / "queries"
    for i in range(17):
        R.link(gardens / "day_right" / f"Image{8 * i:03d}.jpg", db / f"db{i + 1}.jpg")
    q.mkdir()
    for i in range(5):
        shutil.copy(gardens / "night_right" / f"Image{30 * i:03d}.jpg", q / f"q{i + 1}.jpg")
    out = tmp_path / "out"
    args = ["eval", "--database", str(db), "--queries", str(q), "--out", str(out), "--image-size", "96", "160"]
    assert main([*args, "--examples", "3"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == [
        f"unlabelled: {db} and {q} carry no positions (no @UTM@ names, manifest or known layout), so no recall;"
        f" wrote the top-5 of 5 queries to {out / 'predictions.csv'} (for frame-aligned folders pass --layout"
        " frames or --frame-tolerance N)"
    ]
    result = json.loads((out / "results.json").read_text())
    assert result["labelled"] is False and result["recall"] == {} and result["recall_first_stage"] == {}
    assert result["dataset"]["rule"] == "unlabelled" and result["num_queries_with_positives"] == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["query"] for r in rows] == [str(q / f"q{i}.jpg") for i in range(1, 6)]
    assert all(len(r["top5"].split()) == 5 for r in rows)
    assert set(rows[0]) == {"query", "confidence", "first_stage_confidence", "reranked", "top5"}
    assert len(list((out / "examples").glob("query_*.png"))) == 3 and not (out / "recall_curve.png").exists()
    # frame alignment only when asked for: the same folders with --layout frames are scored
    assert main([*args[:-3], "--layout", "frames", "--image-size", "96", "160", "--examples", "0"]) == 0
    assert json.loads((out / "results.json").read_text())["dataset"]["rule"] == "|i-j| <= 0"
