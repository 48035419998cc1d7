"""The database survives interruption and concurrency: a second writer is refused (two
processes), Ctrl-C and SIGKILL mid-run leave SQLite and FAISS consistent, a stale, damaged,
foreign or missing index file is rebuilt from the stored descriptors, a waiting writer gets the
lock once the holder lets go.

No timing assumptions: the writer process is the real CLI with one test hook, which stops it in
the middle of its run (after two committed chunks, inside the third) until the test acts, and the
waiting writer is observed through the lock's retry hook."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import placerank
import placerank.localize.lock as lock_mod
from placerank.localize import DatabaseBusyError, WriteLock
from placerank.localize.features import CHUNK_BATCHES

REPO = Path(__file__).resolve().parents[2]
SIZE = (120, 160)  # tiny input: these tests are about storage, not accuracy
BATCH = 2
CHUNK = BATCH * CHUNK_BATCHES  # photos per committed chunk
MARK = "TEST-WRITER-STOPPED"

# `placerank index`, stopped inside its third chunk (two chunks committed) until stdin has a line.
_WRITER = f"""
import sys
import placerank.localize.features as features
from placerank.cli import main

real, calls = features.extract_features, []

def stop_in_third_chunk(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        print("{MARK}", flush=True)
        sys.stdin.readline()
    return real(*args, **kwargs)

features.extract_features = stop_in_third_chunk
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def inputs(tum, tum_positions, make_model):
    return {
        "all": tum_positions("all.csv", step=5),
        "first": tum_positions("first.csv", 0, 10),
        "more": tum_positions("more.csv", 10, 15),
        "model": make_model("effnet-lite0-gem", image_size=SIZE),
        "query": tum / "queries" / "0400_1305031466.127640.jpg",
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


class _Writer:
    """A `placerank index` process the test stops mid-run: :meth:`wait_stopped` returns once
    it has committed two chunks and is inside the third, holding the lock; it stays there (its
    stdin is a pipe the test keeps open) until signalled."""

    def __init__(self, db: Path, csv_path: Path):
        argv = ["index", "--db", str(db), "--positions", str(csv_path), "--image-size", str(SIZE[0]), str(SIZE[1])]
        argv += ["--batch-size", str(BATCH), "--workers", "0", "--quiet", "--radius", "0.3"]
        read_end, self._hold = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, *argv],
            cwd=REPO,
            stdin=read_end,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        os.close(read_end)

    def wait_stopped(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # blocks until the hook prints, or the process ends (EOF)
            if line.strip() == MARK:
                return
        self.proc.wait()
        pytest.fail(
            f"the writer ended before the test could stop it: rc={self.proc.returncode} {self.proc.stderr.read()}"
        )

    def signal(self, sig: int) -> tuple[int, str]:
        try:
            self.proc.send_signal(sig)
            _, err = self.proc.communicate(timeout=300)
        finally:
            os.close(self._hold)
        return self.proc.returncode, err


def _consistent(db_path: Path, model) -> placerank.Database:
    db = placerank.Database.open(db_path, model=model)
    con = sqlite3.connect(db_path / "placerank.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = np.array(sorted(r[0] for r in con.execute("SELECT id FROM images")), dtype=np.int64)
    con.close()
    assert np.array_equal(db.store.index().ids(), ids)
    return db


def test_second_writer_refused_and_interrupted_runs_recover(inputs, tmp_path):
    db_path = tmp_path / "db"
    total = sum(1 for _ in open(inputs["all"])) - 1
    assert total == 60

    # Process 1 writes; this process (the second writer) is refused while it holds the lock.
    writer = _Writer(db_path, inputs["all"])
    writer.wait_stopped()
    with pytest.raises(DatabaseBusyError) as e:
        placerank.Database.open(db_path).add_folder(positions=inputs["all"])
    assert str(e.value) == (
        f"{db_path.resolve()}: another placerank process (pid {writer.proc.pid}) is writing to this "
        f"database now; wait for it to finish or pass --wait SECONDS"
    )
    # Ctrl-C: the run stops, says so, and what it committed (two chunks) is kept and indexed.
    rc, err = writer.signal(signal.SIGINT)
    assert rc == 130, err
    assert err.strip().endswith("placerank: interrupted; finished work is saved and a re-run resumes")
    n1 = _count(db_path)
    assert n1 == 2 * CHUNK
    db = _consistent(db_path, inputs["model"])
    assert not db.store.index_rebuilt  # the interrupted run saved its index on the way out
    db.close()

    # Process 2 resumes, then is killed outright (no chance to save its FAISS index).
    writer = _Writer(db_path, inputs["all"])
    writer.wait_stopped()
    rc, _ = writer.signal(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    n2 = _count(db_path)
    assert n2 == n1 + 2 * CHUNK
    db = _consistent(db_path, inputs["model"])
    assert db.store.index_rebuilt  # the index file was stale: rebuilt from SQLite, and saved again
    gen = int(db.meta()["generation"])
    assert [p.name for p in db_path.glob("index.g*.faiss")] == [f"index.g{gen}.faiss"]

    # The lock died with the killed process; a re-run adds exactly the rest.
    with db:
        rep = db.add_folder(positions=inputs["all"], progress=False)
        assert rep.unchanged == n2 and len(rep.added) == total - n2 and rep.extracted == total - n2
        assert len(db) == total and len(db.store.index()) == total
        assert db.localize(inputs["query"]).found


def test_stale_damaged_foreign_or_missing_index_file_is_rebuilt(inputs, tmp_path):
    db_path = tmp_path / "db"
    with placerank.Database.create(db_path, model=inputs["model"], radius=0.3) as db:
        db.add_folder(positions=inputs["first"], progress=False)
        old_bytes = next(db_path.glob("index.g*.faiss")).read_bytes()
        db.add_folder(positions=inputs["more"], progress=False)
        gen = int(db.meta()["generation"])
        reference = db.localize(inputs["query"], top_k=15)
    current = db_path / f"index.g{gen}.faiss"
    schema = db_path / "index.json"
    assert current.exists() and schema.exists()
    good_schema = schema.read_text()
    # A crash after the SQLite commit but before the new index was written leaves an older index.
    current.write_bytes(old_bytes)
    for damage in ("stale", "garbage", "foreign schema", "no schema", "missing"):
        if damage == "garbage":
            current.write_bytes(b"\x00not a faiss index" * 10)
        elif damage == "foreign schema":
            schema.write_text(good_schema.replace('"effnet-lite0-gem"', '"another-model"'))
        elif damage == "no schema":  # a database from before index.json existed
            schema.unlink()
        elif damage == "missing":
            current.unlink()
        with placerank.Database.open(db_path, model=inputs["model"]) as db:
            res = db.localize(inputs["query"], top_k=15)
            assert db.store.index_rebuilt, damage
            assert len(db.store.index()) == 15
        assert schema.read_text() == good_schema, damage  # saved again
        assert [m.path for m in res.matches] == [m.path for m in reference.matches]
        assert [m.similarity for m in res.matches] == pytest.approx([m.similarity for m in reference.matches], abs=1e-5)
    with placerank.Database.open(db_path) as db:  # the rebuilt index was saved: no rebuild now
        db.store.index()
        assert not db.store.index_rebuilt


def test_waiting_writer_gets_the_lock(inputs, tmp_path, monkeypatch):
    db_path = tmp_path / "db"
    with placerank.Database.create(db_path, model=inputs["model"], radius=0.3) as db:
        db.add_folder(positions=inputs["first"], progress=False)
    held, release, released = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with WriteLock(db_path.resolve()):
            held.set()
            release.wait()
        released.set()

    retries = []
    real_pause = lock_mod._pause

    def pause(seconds):  # the waiting writer found the lock taken and will try again
        retries.append(seconds)
        if wake_holder:
            release.set()
        real_pause(seconds)

    monkeypatch.setattr(lock_mod, "_pause", pause)
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(60)
        with placerank.Database.open(db_path) as db:
            wake_holder = False
            with pytest.raises(DatabaseBusyError) as e:  # the holder never lets go: refused after 0.3 s
                db.remove([inputs["first"]], wait=0.3)
            assert str(e.value).endswith(
                "is writing to this database after waiting 0.3 s; wait for it to finish or pass --wait SECONDS"
            )
            assert retries and not released.is_set()
            retries.clear()
            wake_holder = True  # now the holder lets go once the writer is waiting
            first = next(csv.DictReader(open(inputs["first"])))["path"]
            rep = db.remove([first], wait=300)
            assert retries and released.is_set()  # it waited, and got the lock when it was let go
            assert rep.removed == [str(Path(first).resolve())] and len(db) == 9
    finally:
        release.set()
        t.join()
