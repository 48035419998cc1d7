"""Shared fixtures. Tests read real data from ../shared (beside the repository); they fail with
a clear message, never skip, when it is missing."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# Two cores shared by torch's threads and DataLoader workers: spinning OpenMP threads waste the
# core the other side needs (measured 10-20x slower small ops under load). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The commands' default runtime (auto) would run large jobs on OpenVINO; this process also loads
# ONNX Runtime to check exports, and the two together corrupted the heap here (docs/inference.md).
# So PyTorch runs everything in this process and its children unless a test asks for OpenVINO;
# the OpenVINO paths and the auto default are tested in child processes without this variable.
os.environ["PLACERANK_RUNTIME"] = "torch"

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


@pytest.fixture(scope="session")
def tum(shared_data) -> Path:
    return _require(shared_data / "tum_rgbd_fr1_desk")


@pytest.fixture(scope="session")
def tum_positions(tum, tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``tum_positions("db.csv", start, stop, step)`` writes a positions CSV (``path,
    easting, northing`` in metres, the TUM frame's tx/ty) for database frames
    ``[start:stop:step]`` and returns its path. Positions come from the dataset's poses.csv."""
    rows = [r for r in csv.DictReader(open(tum / "poses.csv")) if r["split"] == "database"]
    root = tmp_path_factory.mktemp("tum_positions")

    def write(name: str = "db.csv", start: int = 0, stop: int | None = None, step: int = 1) -> Path:
        path = root / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "easting", "northing"])
            for r in rows[start:stop:step]:
                w.writerow([str(tum / r["file"]), r["tx"], r["ty"]])
        return path

    return write


@pytest.fixture(scope="session")
def make_model(shared_weights) -> Callable[..., torch.nn.Module]:
    """Factory: a registered model with the shared weights, in eval mode, e.g.
    ``make_model("effnet-lite0-gem", image_size=(240, 320))``. Models with random heads (FoL,
    SelaVPR) are seeded first so every test sees the same ones."""
    from placerank.models import create

    def build(name: str = "effnet-lite0-gem", seed: int = 0, **kwargs) -> torch.nn.Module:
        torch.manual_seed(seed)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
            return create(name, **kwargs).eval()

    return build


@pytest.fixture(scope="session")
def shared_copy(shared_data, tmp_path_factory) -> Callable[[str], Path]:
    """Factory: ``shared_copy("geotagged_photos")`` copies that shared folder into a new temporary
    folder and returns the copy (tests that write beside the photos never touch ../shared)."""

    def copy(name: str) -> Path:
        dest = tmp_path_factory.mktemp("shared_copy") / name
        shutil.copytree(_require(shared_data / name), dest)
        return dest

    return copy


def _write_frames_csv(path: Path, folder: Path, frames) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "frame"])
        for k in frames:
            w.writerow([str(Path(folder) / f"Image{k:03d}.jpg"), k])
    return Path(path)


@pytest.fixture(scope="session")
def frames_csv() -> Callable[..., Path]:
    """``frames_csv(path, folder, frames)`` writes a ``path,frame`` manifest of a GardensPoint
    traversal's frames (``ImageNNN.jpg``) and returns ``path``."""
    return _write_frames_csv
