"""Descriptors on disk (memory-mapped) and the extraction memory budget (``--max-memory-gb``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import placerank.descriptors.extract as extract_module
from placerank.cli import main
from placerank.descriptors import memory
from placerank.descriptors.extract import extract_features
from placerank.descriptors.files import extract_to_folder, load_descriptors, open_rows
from placerank.errors import PlaceRankError

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = (96, 160)  # small input: the test is about memory bookkeeping, not recall
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(shared_weights):
    from placerank.models import create

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        return create("effnet-lite0-gem", image_size=SIZE).eval()


@pytest.fixture(scope="module")
def paths(shared_data):
    return sorted((shared_data / "gardenspoint_walking" / "day_left").glob("*.jpg"))[:10]


def _record_batches(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = extract_module.make_loader

    def spy(paths, pre, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return real(paths, pre, batch_size, *args, **kwargs)

    monkeypatch.setattr(extract_module, "make_loader", spy)
    return seen


def test_tiny_budget_smaller_batches_same_descriptors(model, paths, monkeypatch):
    seen = _record_batches(monkeypatch)
    full, keys = extract_features(model, paths, CPU, batch_size=8, num_workers=0, use_cache=False, progress=False)
    per_image = memory.per_image_bytes(model, CPU)
    assert memory.input_bytes(model) == 3 * 96 * 160 * 4
    assert per_image >= memory.input_bytes(model)
    # room for the process as it is, the headroom and 3 images: batches of at most 3
    tiny = (memory.resident_bytes() + memory.HEADROOM_BYTES + 3 * per_image) / 2**30
    with memory.memory_budget(tiny):
        small, keys2 = extract_features(model, paths, CPU, batch_size=8, num_workers=0, use_cache=False, progress=False)
    assert seen[0] == 8 and 1 <= seen[1] <= 3
    assert keys == keys2
    np.testing.assert_allclose(small, full, rtol=0, atol=2e-6)  # batch size changes only float rounding
    assert memory.max_memory_gb() == memory.DEFAULT_MAX_MEMORY_GB  # the block restored the default


def test_budget_below_model_size_is_one_line(model, paths, tmp_path, capsys):
    with pytest.raises(PlaceRankError, match=r"below the size of effnet-lite0-gem itself \(0\.01 GB\)"):
        memory.fit_batch_size(model, 16, CPU, budget_gb=0.001)
    db = tmp_path / "db"
    db.mkdir()
    for p in paths[:2]:
        (db / p.name).write_bytes(p.read_bytes())
    argv = ["extract", "--images", str(db), "--out", str(tmp_path / "out"), "--max-memory-gb", "0.005"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("placerank: error: --max-memory-gb 0.005 is below the size")
    with pytest.raises(SystemExit):  # argparse: one line, exit 2
        main(["extract", "--images", str(db), "--out", str(tmp_path / "o2"), "--max-memory-gb", "0"])
    assert "must be a number > 0" in capsys.readouterr().err


def test_extract_into_memmap_and_folder_is_memory_mapped(model, paths, tmp_path):
    rows = open_rows(tmp_path / "rows.npy", len(paths), model.descriptor_dim)
    got, _ = extract_features(model, paths, CPU, num_workers=0, use_cache=False, progress=False, out=rows)
    assert got is rows
    rows.flush()
    on_disk = np.load(tmp_path / "rows.npy")
    np.testing.assert_allclose(np.linalg.norm(on_disk, axis=1), 1.0, atol=1e-5)
    with pytest.raises(PlaceRankError, match=r"out must be a writable float32 array of shape \(10, 1280\)"):
        extract_features(model, paths, CPU, use_cache=False, progress=False, out=np.zeros((3, 1280), np.float32))

    ds, skipped = extract_to_folder(tmp_path / "desc", model, paths, CPU, num_workers=0, use_cache=False)
    assert not skipped
    assert sorted(p.name for p in (tmp_path / "desc").iterdir()) == ["descriptors.json", "descriptors.npy"]
    np.testing.assert_array_equal(np.asarray(ds.descriptors), on_disk)
    loaded = load_descriptors(tmp_path / "desc")
    assert isinstance(loaded.descriptors.base, np.memmap) or isinstance(loaded.descriptors, np.memmap)
    assert not loaded.descriptors.flags.writeable
    np.testing.assert_array_equal(loaded.descriptors, on_disk)
