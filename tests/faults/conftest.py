"""Fixtures of the fault suite: a tiny input set (4 database + 3 query photos with positions in
metres), a one-call CLI runner that returns the exit status and the stderr lines, and a check
that every input file is byte-identical after each test."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from placerank.cli import main

REPO = Path(__file__).resolve().parents[2]
SIZE = ["--image-size", "64", "96"]  # tiny input: these tests are about failures, not accuracy
FAST = [*SIZE, "--batch-size", "4", "--workers", "0"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def inputs(gardens, tmp_path_factory) -> Path:
    """``db/``, ``q/`` (4 + 3 GardensPoint frames) and ``db.csv``, ``q.csv`` (path,easting,northing;
    frame k sits at k * 10 m) in a fresh folder."""
    root = tmp_path_factory.mktemp("fault_inputs")
    for side, src, frames in (("db", "day_right", (0, 1, 2, 3)), ("q", "night_right", (0, 2, 3))):
        (root / side).mkdir()
        rows = []
        for k in frames:
            name = f"Image{k:03d}.jpg"
            shutil.copy(gardens / src / name, root / side / name)
            rows.append([f"{side}/{name}", 10.0 * k, 0.0])
        write_csv(root / f"{side}.csv", ["path", "easting", "northing"], rows)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(autouse=True)
def _inputs_unchanged(request):
    """Every test of the suite: the shared input files are byte-identical afterwards."""
    if "inputs" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("inputs")
    before = snapshot(root)
    yield
    assert snapshot(root) == before, "an input file was changed"


def _error_lines(text: str) -> list[str]:
    lines = text.replace("\r", "\n").splitlines()
    return [ln for ln in lines if ln.strip() and "%|" not in ln and not ln.startswith("placerank: warning:")]


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, list[str]]]:
    """``cli("eval", ...)`` -> (exit status, stderr lines other than progress bars and warnings)."""

    def run(*argv) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # a bad flag: the parser exits
            code = int(e.code or 0)
        return code, _error_lines(capsys.readouterr().err)

    return run


def run_subprocess(argv: list, limit_bytes: int | None = None, env: dict | None = None, timeout: float = 300):
    """The real CLI in a child process, optionally with ``RLIMIT_FSIZE`` (a full disk: writes past
    ``limit_bytes`` fail with EFBIG). Returns (exit status, stderr lines)."""

    def limit() -> None:
        if limit_bytes is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    proc = subprocess.run(
        [sys.executable, "-m", "placerank.cli", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        preexec_fn=limit,
        timeout=timeout,
    )
    return proc.returncode, _error_lines(proc.stderr)
