"""The database survives interruption and concurrency: a second writer is refused (two
processes), Ctrl-C and SIGKILL mid-run leave SQLite and FAISS consistent, a stale or damaged
index file is rebuilt from the stored descriptors, a waiting writer gets the lock."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

import placerank
from placerank.localize.database import DatabaseBusyError, WriteLock
from placerank.models import create as create_model

REPO = Path(__file__).resolve().parents[2]
SIZE = (120, 160)  # tiny input: these tests are about storage, not accuracy


@pytest.fixture(scope="module")
def tum(shared_data, tmp_path_factory, shared_weights):
    base = shared_data / "tum_rgbd_fr1_desk"
    root = tmp_path_factory.mktemp("tum_safety")
    rows = [r for r in csv.DictReader(open(base / "poses.csv")) if r["split"] == "database"]

    def write(name, frames):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "easting", "northing"])
            for r in frames:
                w.writerow([str(base / r["file"]), r["tx"], r["ty"]])
        return root / name

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        model = create_model("effnet-lite0-gem", image_size=SIZE)
    return {
        "all": write("all.csv", rows[::5]),
        "first": write("first.csv", rows[:10]),
        "more": write("more.csv", rows[10:15]),
        "model": model,
        "query": base / "queries" / "0400_1305031466.127640.jpg",
    }


def _count(db: Path) -> int:
    if not (db / "placerank.sqlite").exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db / 'placerank.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # not created yet
        return 0


def _start_writer(db: Path, csv_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "placerank.cli",
        "index",
        "--db",
        str(db),
        "--positions",
        str(csv_path),
        "--image-size",
        str(SIZE[0]),
        str(SIZE[1]),
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
        "--radius",
        "0.3",
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)


def _wait_for_rows(proc: subprocess.Popen, db: Path, at_least: int) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before it could be interrupted: rc={proc.returncode} {proc.stderr.read()}")
        n = _count(db)
        if n >= at_least:
            return n
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the writer committed nothing within 240 s")


def _consistent(db_path: Path, model) -> placerank.Database:
    db = placerank.Database.open(db_path, model=model)
    con = sqlite3.connect(db_path / "placerank.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = np.array(sorted(r[0] for r in con.execute("SELECT id FROM images")), dtype=np.int64)
    con.close()
    index = db._ensure_index()
    assert np.array_equal(np.sort(faiss.vector_to_array(index.id_map)), ids)
    return db


def test_second_writer_refused_and_interrupted_runs_recover(tum, tmp_path):
    db_path = tmp_path / "db"
    total = sum(1 for _ in open(tum["all"])) - 1
    assert total == 60

    # Process 1 writes; this process (the second writer) is refused while it holds the lock.
    proc = _start_writer(db_path, tum["all"])
    _wait_for_rows(proc, db_path, 2)
    with pytest.raises(DatabaseBusyError) as e:
        placerank.Database.open(db_path).add_folder(positions=tum["all"])
    assert str(e.value) == (
        f"{db_path.resolve()}: another placerank process (pid {proc.pid}) is writing to this "
        f"database now; wait for it to finish or pass --wait SECONDS"
    )
    # Ctrl-C: the run stops, says so, and what it committed is kept and indexed.
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().endswith("placerank: interrupted; finished work is saved and a re-run resumes")
    n1 = _count(db_path)
    assert 2 <= n1 < total
    _consistent(db_path, tum["model"]).close()

    # Process 2 resumes, then is killed outright (no chance to save its FAISS index).
    proc = _start_writer(db_path, tum["all"])
    _wait_for_rows(proc, db_path, n1 + 2)
    proc.kill()
    proc.communicate(timeout=60)
    n2 = _count(db_path)
    assert n1 + 2 <= n2 < total
    db = _consistent(db_path, tum["model"])
    assert db.index_rebuilt  # the index file was stale: rebuilt from SQLite, and saved again
    gen = int(db.meta()["generation"])
    assert [p.name for p in db_path.glob("index.g*.faiss")] == [f"index.g{gen}.faiss"]

    # The lock died with the killed process; a re-run adds exactly the rest.
    with db:
        rep = db.add_folder(positions=tum["all"], progress=False)
        assert rep.unchanged == n2 and len(rep.added) == total - n2 and rep.extracted == total - n2
        assert len(db) == total and db._ensure_index().ntotal == total
        assert db.localize(tum["query"]).found


def test_stale_damaged_or_missing_index_file_is_rebuilt(tum, tmp_path):
    db_path = tmp_path / "db"
    with placerank.Database.create(db_path, model=tum["model"], radius=0.3) as db:
        db.add_folder(positions=tum["first"], progress=False)
        old_bytes = next(db_path.glob("index.g*.faiss")).read_bytes()
        db.add_folder(positions=tum["more"], progress=False)
        gen = int(db.meta()["generation"])
        reference = db.localize(tum["query"], top_k=15)
    current = db_path / f"index.g{gen}.faiss"
    assert current.exists()
    # A crash after the SQLite commit but before the new index was written leaves an older index.
    current.write_bytes(old_bytes)
    for damage in ("stale", "garbage", "missing"):
        if damage == "garbage":
            current.write_bytes(b"\x00not a faiss index" * 10)
        elif damage == "missing":
            current.unlink()
        with placerank.Database.open(db_path, model=tum["model"]) as db:
            res = db.localize(tum["query"], top_k=15)
            assert db.index_rebuilt, damage
            assert db._ensure_index().ntotal == 15
        assert [m.path for m in res.matches] == [m.path for m in reference.matches]
        assert [m.similarity for m in res.matches] == pytest.approx([m.similarity for m in reference.matches], abs=1e-5)
    with placerank.Database.open(db_path) as db:  # the rebuilt index was saved: no rebuild now
        db._ensure_index()
        assert not db.index_rebuilt


def test_waiting_writer_gets_the_lock(tum, tmp_path):
    db_path = tmp_path / "db"
    with placerank.Database.create(db_path, model=tum["model"], radius=0.3) as db:
        db.add_folder(positions=tum["first"], progress=False)
    released = threading.Event()

    def hold():
        with WriteLock(db_path.resolve()):
            time.sleep(1.0)
        released.set()

    t = threading.Thread(target=hold)
    t.start()
    time.sleep(0.2)
    with placerank.Database.open(db_path) as db:
        with pytest.raises(DatabaseBusyError) as e:
            db.remove([tum["first"]], wait=0.3)
        assert str(e.value).endswith(
            "is writing to this database after waiting 0.3 s; wait for it to finish or pass --wait SECONDS"
        )
        t0 = time.monotonic()
        first = next(csv.DictReader(open(tum["first"])))["path"]
        rep = db.remove([first], wait=30)
        assert released.is_set() and time.monotonic() - t0 > 0.3
        assert rep.removed == [str(Path(first).resolve())] and len(db) == 9
    t.join()
