"""``kill -9`` in the middle of ``eval`` (after extraction, while writing its outputs): the
previous outputs stay whole, and a rerun ends with the same result as an uninterrupted run and
removes the killed run's temporary folder. ``kill -9`` in the middle of ``train`` (just after the
first epoch's checkpoint is written): a rerun resumes and ends with the same weights, bit for bit,
as an uninterrupted run with the same seed."""

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


# the real CLI, killed (SIGKILL) right after the first checkpoint is written, before anything else
_KILLED_TRAIN = """
import os, signal, sys
from placerank.train.common import RunDir
from placerank.cli import main

save = RunDir.save_checkpoint

def save_and_die(self, state):
    save(self, state)
    os.kill(os.getpid(), signal.SIGKILL)

RunDir.save_checkpoint = save_and_die
sys.exit(main(sys.argv[1:]))
"""


def _untimed(value):
    """``value`` without its measured times (``*_s``, ``*ms*`` keys), which differ run to run."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not (k.endswith("_s") or "ms" in k.split("_"))}
    return value


def _result(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    return _untimed({k: v for k, v in r.items() if k not in ("timing_s", "peak_memory_mb")})


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


def test_train_killed_after_a_checkpoint_then_rerun_resumes_to_the_same_weights(gardens, cli, tmp_path, single_thread):
    import torch

    # single_thread: the killed child runs with OMP_NUM_THREADS=1; the same thread count here keeps
    # the float sums (and so the weights) comparable bit for bit

    # FoL on 4 places x 2 traversals, 2 batches per epoch, 2 epochs (~5 s a run)
    argv = ["train", "--method", "fol", "--train", gardens / "day_left", gardens / "day_right", "--frames", "0", "4",
            "--image-size", "128", "160", "--places-per-batch", "2", "--images-per-place", "2", "--workers", "0",
            "--epochs", "2", "--seed", "3"]  # fmt: skip
    assert cli(*argv, "--out", tmp_path / "whole")[0] == 0
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAIN, *map(str, argv), "--out", str(killed)],
        cwd=REPO,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(killed)) == ["checkpoint.pt", "config.json", "log.jsonl"]  # no model.pt yet
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert cli(*argv, "--out", killed)[0] == 0
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert next(r for r in log if r.get("event") == "resume")["epoch"] == 1
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)
    resumed = torch.load(killed / "model.pt", weights_only=False)
    assert whole["extra"] == resumed["extra"] == {"method": "fol", "steps": 4, "stopped": None}
    a, b = whole["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # bit-identical, dropout masks included
