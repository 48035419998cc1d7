"""Extraction by several processes on CPU (gloo), real GardensPoint frames, 96 px:
``torchrun --nproc-per-node 2 -m placerank extract`` killed on one rank resumes under
``placerank extract --nproc 2`` and gives the descriptors (and ranking) of one process;
``placerank eval --nproc 2`` gives the recall and ranking of ``--nproc 1``; bad ``--nproc`` is one
line. Process start-up is slow on 2 cores, so the runs are shared by the tests of this module."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from placerank.cli import main
from placerank.descriptors.files import load_descriptors

pytestmark = pytest.mark.usefixtures("single_thread")
COMMON = ["--image-size", "96", "--workers", "0", "--batch-size", "2", "--no-cache"]


def _error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def runs(frames_csv, gardens, tum_positions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nproc")
    old = os.environ.get("PLACERANK_CACHE")
    os.environ["PLACERANK_CACHE"] = str(tmp / "cache")
    try:
        db = frames_csv(tmp / "db.csv", gardens / "day_right", range(0, 16, 2))  # 8 images: 4 per rank
        q = frames_csv(tmp / "q.csv", gardens / "day_left", range(1, 16, 3))
        out = {"tmp": tmp, "db": db, "q": q}
        assert main(["extract", "--images", str(db), "--out", str(tmp / "one"), *COMMON]) == 0

        # torchrun, rank 1 killed (SIGKILL) after its first chunk of 2 rows
        env = {**os.environ, "PLACERANK_SHARD_STOP_AFTER": "1@1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "placerank"]
        cmd += ["extract", "--images", str(db), "--out", str(tmp / "two"), *COMMON]
        killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        out["killed"] = killed
        out["progress"] = [
            json.loads((tmp / "two" / "shards" / f"rank-{r}-of-2" / "progress.json").read_text()) for r in (0, 1)
        ]
        resumed = io.StringIO()  # in this process: the ranks fork from it (one thread each)
        with contextlib.redirect_stdout(resumed):
            code = main(["extract", "--images", str(db), "--out", str(tmp / "two"), *COMMON, "--nproc", "2"])
        again = io.StringIO()
        with contextlib.redirect_stdout(again):  # a rerun finds the merged folder: no ranks started
            assert main(["extract", "--images", str(db), "--out", str(tmp / "two"), *COMMON, "--nproc", "2"]) == 0
        out["resumed"] = (code, resumed.getvalue(), again.getvalue())
        ev = ["eval", "--database", str(db), "--queries", str(q), "--frame-tolerance", "2", "--examples", "0"]
        for n in (1, 2):
            assert main([*ev, *COMMON, "--nproc", str(n), "--out", str(tmp / f"eval{n}")]) == 0
        photos = tum_positions("nproc.csv", 0, 16, 2)  # 8 TUM desk photos with their positions
        out["index_log"] = {}
        for n in (1, 2):
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                args = ["index", "--db", str(tmp / f"db{n}"), "--positions", str(photos), "--quiet"]
                assert main([*args, *COMMON[:-1], "--nproc", str(n)]) == 0
            out["index_log"][n] = log.getvalue()
        yield out
    finally:
        if old is None:
            os.environ.pop("PLACERANK_CACHE", None)
        else:
            os.environ["PLACERANK_CACHE"] = old


def test_killed_torchrun_rank_resumes_and_two_ranks_equal_one(runs):
    assert runs["killed"].returncode != 0  # torchrun reports the killed rank
    rank0, rank1 = runs["progress"]
    assert rank1["done"] == 2 and rank1["rows"] == 4  # rank 1's first chunk, then SIGKILL
    assert rank0["done"] in (0, 2, 4)  # rank 0 is stopped by torchrun wherever it had got to
    code, stdout, again = runs["resumed"]
    assert again.startswith(f"{runs['tmp'] / 'two'}: up to date, 8 images x 1280-d")
    assert code == 0
    before = rank0["done"] + rank1["done"]
    assert f"from 2 ranks ({before} rows were done by an interrupted run)" in stdout
    one, two = load_descriptors(runs["tmp"] / "one"), load_descriptors(runs["tmp"] / "two")
    assert not (runs["tmp"] / "two" / "shards").exists()
    assert one.meta() == two.meta()  # same paths, keys, model, fingerprint: `placerank search` reads either
    # not bit-identical across processes (1 vs 2 intra-op threads sum in another order): ~3e-7 measured
    np.testing.assert_allclose(two.descriptors, one.descriptors, rtol=0, atol=1e-6)
    rank = lambda d: np.argsort(-(d @ d.T), axis=1, kind="stable")  # noqa: E731
    np.testing.assert_array_equal(rank(two.descriptors), rank(one.descriptors))


def test_eval_with_two_ranks_gives_the_recall_and_ranking_of_one(runs):
    r1, r2 = (json.loads((runs["tmp"] / f"eval{n}" / "results.json").read_text()) for n in (1, 2))
    assert r2["recall"] == r1["recall"] and r2["recall_first_stage"] == r1["recall_first_stage"]
    assert r1["recall"]["1"] >= 0.5  # day_left -> day_right at 96 px: measured 0.67 (4 of 6)

    def ranking(n):
        text = (runs["tmp"] / f"eval{n}" / "predictions.csv").read_text().splitlines()
        return [line.rsplit(",", 1)[-1] for line in text]  # the top-5 paths of each query

    assert ranking(2) == ranking(1)
    assert not (runs["tmp"] / "cache" / "shards").exists()  # the scratch shards are removed


@pytest.mark.parametrize("value", ["0", "65", "-1"])
def test_bad_nproc_is_one_line(runs, value, capsys):
    for command in (["extract", "--images", str(runs["db"]), "--out", str(runs["tmp"] / "bad")], ["eval"]):
        args = (
            [*command, "--database", str(runs["db"]), "--queries", str(runs["q"])] if command == ["eval"] else command
        )
        if command == ["eval"]:
            args += ["--out", str(runs["tmp"] / "bad-eval")]
        assert main([*args, "--nproc", value]) == 2
        assert _error(capsys) == f"placerank: error: --nproc must be a whole number from 1 to 64, got {value}"
    assert not (runs["tmp"] / "bad").exists()


def test_nproc_under_torchrun_is_refused(runs, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["extract", "--images", str(runs["db"]), "--out", str(runs["tmp"] / "bad"), "--nproc", "2"]) == 2
    assert _error(capsys) == (
        "placerank: error: --nproc 2 launches its own processes; under torchrun (WORLD_SIZE=2) drop --nproc"
    )


def test_a_failed_rank_is_one_line(runs, gardens, capsys):
    """Truncated JPEGs in both ranks' shares: a rank's own message, named, on one line."""
    broken = [runs["tmp"] / f"broken{i}.jpg" for i in (1, 2)]
    for b in broken:
        b.write_bytes((gardens / "day_right" / "Image003.jpg").read_bytes()[:2000])
    csv = runs["tmp"] / "broken.csv"
    csv.write_text(f"path,frame\n{gardens / 'day_right' / 'Image000.jpg'},0\n{broken[0]},1\n{broken[1]},2\n")
    assert main(["extract", "--images", str(csv), "--out", str(runs["tmp"] / "broken"), *COMMON, "--nproc", "2"]) == 2
    line = _error(capsys)
    assert line.startswith("placerank: error: extraction rank ") and " of 2 failed: " in line
    assert any(f"{b}: cannot read image" in line for b in broken)
    assert line.endswith("(its finished chunks are kept for a rerun)")


def test_index_with_two_ranks_stores_the_descriptors_of_one(runs):
    from placerank.localize.database import Database

    def stored(n):
        with Database.open(runs["tmp"] / f"db{n}", read_only=True) as db:
            rows = db.store.images.rows(db.store.images.ids().tolist())
            ids, descs = next(db.store.images.descriptor_chunks())
            return {rows[int(i)].path: d for i, d in zip(ids, descs)}

    one, two = stored(1), stored(2)
    assert sorted(one) == sorted(two) and len(one) == 8
    for path in one:  # not bit-identical across processes (1 vs 2 threads): ~3e-7
        np.testing.assert_allclose(two[path], one[path], rtol=0, atol=1e-6)
    assert "8 photo(s)" in runs["index_log"][2] or "added 8" in runs["index_log"][2], runs["index_log"][2]


def test_index_bad_nproc_is_one_line_and_makes_no_database(runs, capsys):
    db = runs["tmp"] / "bad-db"
    assert main(["index", str(runs["tmp"]), "--db", str(db), "--nproc", "0"]) == 2
    assert _error(capsys) == "placerank: error: --nproc must be a whole number from 1 to 64, got 0"
    assert not db.exists()
