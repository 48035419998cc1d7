"""``kill -9`` in the middle of ``eval`` (after extraction, while writing its outputs): the
previous outputs stay whole, and a rerun ends with the same result as an uninterrupted run and
removes the killed run's temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import FAST, REPO

# the real CLI, killed (SIGKILL, no clean-up) once results.json is written into the temporary folder
_KILLED = """
import os, signal, sys
import placerank.eval.evaluate as evaluate
from placerank.cli import main

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

evaluate.write_predictions = die
sys.exit(main(sys.argv[1:]))
"""


def _result(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    return {k: v for k, v in r.items() if k not in ("timing_s", "peak_memory_mb")}


def test_eval_killed_while_writing_then_rerun(inputs, cli, tmp_path):
    out = tmp_path / "work" / "run"
    argv = ["eval", "--database", inputs / "db.csv", "--queries", inputs / "q.csv", "--radius", "15", *FAST,
            "--examples", "1", "--out", out]  # fmt: skip
    assert cli(*argv)[0] == 0
    uninterrupted = _result(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the previous outputs, whole
    leftovers = [p.name for p in out.parent.iterdir() if p.name != "run"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.")  # the killed run's temporary folder
    assert cli(*argv)[0] == 0
    assert _result(out) == uninterrupted
    assert sorted(os.listdir(out.parent)) == ["run"]


def test_broken_and_looping_symlinks_are_said(tmp_path, capsys, inputs):
    from placerank.data.readers import list_images

    (tmp_path / "Image000.jpg").symlink_to(inputs / "db" / "Image000.jpg")
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert list_images(tmp_path) == [tmp_path / "Image000.jpg"]
    assert capsys.readouterr().err == (
        f"placerank: warning: {tmp_path}: skipped 2 broken or looping symlink(s), e.g. {tmp_path / 'gone.jpg'}\n"
    )
