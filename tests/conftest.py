"""Shared fixtures. Tests read real data from ../shared (beside the repository); they fail with
a clear message, never skip, when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

# Two cores shared by torch's threads and DataLoader workers: spinning OpenMP threads waste the
# core the other side needs (measured 10-20x slower small ops under load). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PLACERANK_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (clone the repo next to ../shared or set PLACERANK_SHARED)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED / "data")


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    return _require(SHARED / "weights")


@pytest.fixture(scope="session")
def gardens(shared_data) -> Path:
    return _require(shared_data / "gardenspoint_walking")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own descriptor cache so tests never see each other's results."""
    monkeypatch.setenv("PLACERANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(SHARED / "weights"))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module: on a shared 2-core machine, 2 OpenMP threads spin-wait
    against other processes and small ops run ~10x slower (measured); restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
