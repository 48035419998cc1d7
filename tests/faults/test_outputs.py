"""Outputs: ``--out`` is checked before any work; eval writes into a temporary folder beside
``--out`` and renames it into place only when complete (the previous outputs are replaced or
kept as a whole, never mixed); created files follow the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from .conftest import FAST


def _eval(inputs: Path, out: Path, *extra) -> list:
    return ["eval", "--database", inputs / "db.csv", "--queries", inputs / "q.csv", "--radius", "15", *FAST,
            "--out", out, *extra]  # fmt: skip


def _extraction_must_not_run(monkeypatch):
    import placerank.eval.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("extraction ran before --out was checked")

    monkeypatch.setattr(evaluate, "extract_descriptors", never)


def test_out_that_is_a_file_is_refused_before_extraction(inputs, cli, tmp_path, monkeypatch):
    _extraction_must_not_run(monkeypatch)
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert cli(*_eval(inputs, out)) == (2, [f"placerank: error: --out {out} is an existing file; give a folder"])
    assert out.read_text() == "keep me"


def test_out_below_a_file_is_refused_before_extraction(inputs, cli, tmp_path, monkeypatch):
    _extraction_must_not_run(monkeypatch)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "sub"
    assert cli(*_eval(inputs, out)) == (2, [f"placerank: error: --out {out}: {tmp_path / 'f'} is not a folder"])


def test_unwritable_out_is_refused_before_extraction(inputs, cli, tmp_path, monkeypatch):
    _extraction_must_not_run(monkeypatch)
    import placerank.utils as utils

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere: stand in for a folder without write permission
    monkeypatch.setattr(utils.os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m))
    out = locked / "run"
    assert cli(*_eval(inputs, out)) == (
        2,
        [f"placerank: error: --out {out}: cannot write in {locked} (permission denied or read-only)"],
    )


def test_out_holding_other_files_is_refused(inputs, cli, tmp_path, monkeypatch):
    _extraction_must_not_run(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(*_eval(inputs, tmp_path)) == (
        2,
        [
            f"placerank: error: --out {tmp_path} holds files this command did not write (e.g. notes.txt), and the"
            " folder is replaced as a whole; give a new folder or a previous run's"
        ],
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rerun_replaces_outputs_as_a_whole_and_a_failed_run_keeps_them(inputs, cli, tmp_path, monkeypatch):
    out = tmp_path / "work" / "run"
    old_umask = os.umask(0o022)
    try:
        assert cli(*_eval(inputs, out, "--examples", "2"))[0] == 0
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == [
        "examples", "pr_curve.png", "predictions.csv", "recall_curve.png", "results.json"
    ]  # fmt: skip
    for p in out.rglob("*"):  # the umask's modes, not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
    first = (out / "results.json").read_bytes()

    # a run that fails while writing keeps the previous outputs whole, and leaves no temporary folder
    import placerank.eval.evaluate as evaluate

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_predictions", fail)
    assert cli(*_eval(inputs, out, "--examples", "0")) == (
        2,
        [f"placerank: error: cannot write {out}: no space left on device; free some space or write elsewhere"],
    )
    assert (out / "results.json").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == [
        "examples", "pr_curve.png", "predictions.csv", "recall_curve.png", "results.json"
    ]  # fmt: skip
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]

    # a finished rerun replaces them all: no example pictures of the earlier run stay behind
    monkeypatch.undo()
    assert cli(*_eval(inputs, out, "--examples", "0"))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "pr_curve.png",
        "predictions.csv",
        "recall_curve.png",
        "results.json",
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_atomic_path_follows_the_umask(tmp_path):
    from placerank.utils import write_json_atomic

    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS", "EACCES"])
def test_atomic_path_names_the_file_and_the_cause(tmp_path, errno_name):
    import errno

    from placerank.errors import PlaceRankError
    from placerank.utils import atomic_path

    cause = {"ENOSPC": "no space left on device; free some space or write elsewhere",
             "EROFS": "read-only file system; write elsewhere",
             "EACCES": "permission denied; check the file's permissions or write elsewhere"}[errno_name]  # fmt: skip
    target = tmp_path / "x.bin"
    with pytest.raises(PlaceRankError) as e, atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    assert str(e.value) == f"cannot write {target}: {cause}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["localize", "P.jpg", "--db", "DB"],
        ["extract", "--images", "I"],
        ["search", "--database", "D", "--queries", "Q"],
        ["rerank", "--candidates", "C", "--rerank", "ransac-xfeat"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_checks_out_before_work(argv, cli, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert cli(*argv, "--out", out) == (2, [f"placerank: error: --out {out} is an existing file; give a folder"])
    assert out.read_text() == "keep me"


def test_index_db_that_is_a_file_is_refused(inputs, cli, tmp_path):
    db = tmp_path / "db"
    db.write_text("keep me")
    assert cli("index", inputs / "db", "--db", db) == (
        2,
        [f"placerank: error: --db {db} is an existing file; give a database folder"],
    )
    assert db.read_text() == "keep me"


def test_eval_config_numbers_are_checked_from_python(inputs, tmp_path):
    from placerank.errors import PlaceRankError
    from placerank.eval.evaluate import EvalConfig, evaluate

    for kw, message in (
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"radius": -5.0}, "radius must be a number of metres > 0, got -5.0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ):
        cfg = EvalConfig(database=inputs / "db.csv", queries=inputs / "q.csv", out=tmp_path / "o", **kw)
        with pytest.raises(PlaceRankError) as e:
            evaluate(cfg)
        assert str(e.value) == message
    assert not (tmp_path / "o").exists()


def test_localize_json_is_strict_json_non_finite_numbers_are_null(tmp_path):
    import json
    import math

    import numpy as np

    from placerank.localize.results import LocalizeResult, Match

    nan, inf = float("nan"), float("inf")
    match = Match(1, "db/a.jpg", np.float32(nan), inf, 0.0, True, -inf, nan, nan, nan, nan, "")
    result = LocalizeResult(
        "q.jpg", "local", nan, nan, np.float64(nan), inf, "", np.float32(nan), 1.0, None, 1.5, 25.0, [match],
        "effnet-lite0-gem", "w", None, "db", 1, timing_s={"total": nan, "ok": np.float32(0.5)},
    )  # fmt: skip
    path = tmp_path / "q.json"
    result.save_json(path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert saved == result.to_json()
    assert (saved["lat"], saved["easting"], saved["northing"], saved["confidence"]) == (None, None, None, None)
    assert saved["matches"][0]["similarity"] is None and saved["matches"][0]["rerank_score"] is None
    assert saved["matches"][0]["distance_m"] is None and saved["timing_s"] == {"total": None, "ok": 0.5}
    assert saved["share"] == 1.0 and saved["radius_m"] == 25.0 and not math.isnan(saved["margin_factor"])
