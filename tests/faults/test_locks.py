"""The database write lock: a lock whose holder is dead is taken over at once, also while forked
children (DataLoader workers) that inherited it still run after a ``kill -9``; a live holder is
refused naming its pid; ``--wait`` is honoured for a database that is being created."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from placerank.localize.lock import DatabaseBusyError, WriteLock, holder_is_dead, holder_text

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, forks a child that inherits it (as a DataLoader worker does) and prints both pids.
_HOLDER = """
import os, sys, time
from pathlib import Path
from placerank.localize.lock import WriteLock
lock = WriteLock(Path(sys.argv[1])).__enter__()
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    parent, child = map(int, proc.stdout.readline().split())
    yield proc, parent, child
    for pid in (parent, child):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_live_holder_is_refused_naming_its_pid(tmp_path, holder):
    _, parent, _ = holder
    with pytest.raises(DatabaseBusyError) as e, WriteLock(tmp_path):
        pass
    assert str(e.value) == (
        f"{tmp_path}: another placerank process (pid {parent}) is writing to this database now;"
        " wait for it to finish or pass --wait SECONDS"
    )


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_dead_holder_is_taken_over_at_once_while_its_children_live(tmp_path, holder, reap):
    proc, parent, child = holder
    os.kill(parent, signal.SIGKILL)
    if reap:
        proc.wait()
    else:  # killed but not yet reaped by its parent (this test): a zombie
        while Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    os.kill(child, 0)  # the inherited lock is still held by the child
    t0 = time.monotonic()
    with WriteLock(tmp_path) as lock:
        assert (tmp_path / "write.lock").read_text() == holder_text()
        assert lock.path.exists()
    assert time.monotonic() - t0 < 1.0


def test_holder_text_and_reused_pids():
    me = holder_text()
    assert not holder_is_dead(me)
    pid, start, host = me.split()
    assert holder_is_dead(f"{pid} {int(start) + 1} {host}")  # same pid, another process (reused pid)
    assert not holder_is_dead(f"{pid} {int(start) + 1} another-host")  # never judged across hosts
    assert not holder_is_dead("")  # a holder that has not written its name yet
    assert not holder_is_dead(pid)  # the old format (pid only) of a live process


def test_wait_is_honoured_for_a_new_database(tmp_path, monkeypatch):
    """``index --wait`` on a database another process is creating right now waits for it instead
    of being refused at once."""
    import placerank.localize.database as database

    stub = type("NoModel", (), {"descriptor_dim": 8})()  # storage only: the index kind is checked on its size
    monkeypatch.setattr(database, "build_model", lambda *a, **k: stub)
    monkeypatch.setattr(database, "model_meta", lambda *a, **k: {"model": "m"})
    folder = tmp_path / "db"
    folder.mkdir()
    first = WriteLock(folder).__enter__()
    try:
        with pytest.raises(DatabaseBusyError):  # no --wait: refused at once, as before
            database.Database.open_or_create(folder, wait=0)
    finally:
        timer = threading.Timer(0.3, first.__exit__, (None, None, None))
        timer.start()
    t0 = time.monotonic()
    db = database.Database.open_or_create(folder, wait=10)
    assert time.monotonic() - t0 >= 0.25
    db.close()
    timer.join()
