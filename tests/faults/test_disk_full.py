"""A full disk, through ``RLIMIT_FSIZE`` in a child process (writes past the limit fail with
EFBIG, as on a full disk, with no mount needed): the real cause reaches the user in one line
naming the file, exit 2, and nothing half-written stays (no temporary folder, no half-made
database, the previous outputs whole)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conftest import FAST, run_subprocess

LIMIT = "file too large (disk quota or file-size limit reached); free some space or write elsewhere"


def _eval(inputs: Path, out: Path, *extra) -> list:
    return ["eval", "--database", inputs / "db.csv", "--queries", inputs / "q.csv", "--radius", "15", *FAST,
            "--examples", "0", *extra, "--out", out]  # fmt: skip


def test_eval_disk_full_keeps_the_previous_outputs(inputs, tmp_path, cli):
    out = tmp_path / "work" / "run"
    assert cli(*_eval(inputs, out, "--no-cache")) == (0, [])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # results.json (~2 KB) and predictions.csv fit; recall_curve.png (~30 KB) does not
    code, lines = run_subprocess(_eval(inputs, out, "--no-cache"), limit_bytes=12_000)
    assert (code, lines) == (2, [f"placerank: error: cannot write {out / 'recall_curve.png'}: {LIMIT}"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(out.parent)) == ["run"]  # no temporary folder left
    assert json.loads(before["results.json"])["num_queries"] == 3


def test_cache_that_cannot_grow_is_skipped_with_the_cause(inputs, tmp_path):
    cache = tmp_path / "cache"
    code, err = run_subprocess(_eval(inputs, tmp_path / "run"), limit_bytes=2_000, env={"PLACERANK_CACHE": str(cache)})
    assert code == 2  # the outputs cannot be written either (results.json is > 2 KB); the cache was only skipped
    assert err == [f"placerank: error: cannot write {tmp_path / 'run' / 'results.json'}: {LIMIT}"]


def test_index_disk_full_leaves_no_half_made_database(inputs, tmp_path):
    db = tmp_path / "db"
    argv = ["index", inputs / "db", "--db", db, *FAST, "--allow-no-gps", "--quiet"]
    code, lines = run_subprocess(argv, limit_bytes=30_000)
    assert (code, lines) == (2, [f"placerank: error: cannot write {db / 'placerank.sqlite'}: {LIMIT}"])
    assert not db.exists()
