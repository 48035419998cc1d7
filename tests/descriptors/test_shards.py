"""Sharded extraction in one process (the ranks run one after the other, no process group): the
shards of 2 ranks merge into exactly the folder single-process ``placerank extract`` writes, a
killed rank resumes after its last committed chunk, a shard of other work is restarted, and the
ranks' local-feature stores merge into one. Real GardensPoint frames, shared weights, 96 px.
The multi-process paths (torchrun, ``--nproc``) are in tests/commands/test_nproc.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import placerank.descriptors.shards as shards
from placerank.descriptors.files import extract_to_folder, load_descriptors
from placerank.errors import PlaceRankError

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(make_model):
    return make_model("effnet-lite0-gem", image_size=(96, 96))


@pytest.fixture(scope="module")
def paths(gardens):
    return [gardens / "day_right" / f"Image{k:03d}.jpg" for k in range(11)]  # 11: ranks of 6 and 5 rows


@pytest.fixture(scope="module")
def reference(model, paths, tmp_path_factory):
    """What single-process ``placerank extract`` writes (no cache: really extracted)."""
    folder = tmp_path_factory.mktemp("single") / "db"
    extract_to_folder(folder, model, paths, CPU, batch_size=2, num_workers=0, use_cache=False)
    return load_descriptors(folder)


def _shards(model, paths, folder, ranks=(0, 1), **kw):
    return [
        shards.extract_shard(
            model, paths, CPU, folder, r, 2, batch_size=2, num_workers=0, use_cache=False, progress=False, **kw
        )
        for r in ranks
    ]


def test_rank_r_takes_every_wth_image_and_the_merge_restores_the_order(model, paths, reference, tmp_path):
    folder = tmp_path / "db"
    assert _shards(model, paths, folder) == [(0, 6), (0, 5)]
    rank1 = np.load(shards.shard_folder(folder, 1, 2) / "descriptors.npy")
    np.testing.assert_array_equal(rank1, reference.descriptors[1::2])  # strided: images 1, 3, 5, ...
    progress = json.loads((shards.shard_folder(folder, 0, 2) / "progress.json").read_text())
    assert (progress["done"], progress["rows"], progress["total"], progress["world"]) == (6, 6, 11, 2)

    merged = shards.merge_shards(folder, 2, model, paths)
    assert not (folder / "shards").exists()  # removed once the folder is whole
    again = load_descriptors(folder)  # the folder `placerank search` reads, unchanged
    # same process, same threads: bit-identical rows (across processes: see test_nproc.py)
    np.testing.assert_array_equal(again.descriptors, reference.descriptors)
    assert again.meta() == reference.meta() == merged.meta()
    assert (folder / "descriptors.json").read_text() == (reference.folder / "descriptors.json").read_text()


def test_a_killed_rank_resumes_after_its_last_chunk(model, paths, reference, tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    def die():
        raise Killed  # what SIGKILL would do, without killing pytest: nothing after this line runs

    folder = tmp_path / "db"
    monkeypatch.setattr(shards, "_die", die)
    monkeypatch.setenv(shards.STOP_ENV, "1@1")  # rank 1 dies after 1 chunk (2 rows: ~8 chunks a shard)
    assert _shards(model, paths, folder, ranks=(0,)) == [(0, 6)]
    with pytest.raises(Killed):
        _shards(model, paths, folder, ranks=(1,))
    progress = json.loads((shards.shard_folder(folder, 1, 2) / "progress.json").read_text())
    assert progress["done"] == 2
    monkeypatch.delenv(shards.STOP_ENV)

    seen = []
    real = shards.extract_features
    monkeypatch.setattr(
        shards, "extract_features", lambda m, part, *a, **k: seen.extend(part) or real(m, part, *a, **k)
    )
    assert _shards(model, paths, folder) == [(6, 6), (2, 5)]  # rank 0 done, rank 1 resumed at row 2
    assert seen == paths[5::2]  # only rank 1's rows 2.. (images 5, 7, 9) were extracted again
    shards.merge_shards(folder, 2, model, paths)
    np.testing.assert_array_equal(load_descriptors(folder).descriptors, reference.descriptors)


def test_a_shard_of_other_work_is_restarted_and_an_unfinished_one_is_not_merged(model, paths, tmp_path, capsys):
    folder = tmp_path / "db"
    _shards(model, paths[:7], folder)  # another image list, same W
    capsys.readouterr()
    assert _shards(model, paths, folder, ranks=(0,)) == [(0, 6)]  # restarted from row 0
    assert "holds a shard of other work" in capsys.readouterr().err
    with pytest.raises(PlaceRankError, match=r"rank-1-of-2: shard of other work .*; rerun the same command$"):
        shards.merge_shards(folder, 2, model, paths)
    assert not (folder / "descriptors.json").exists()


def test_each_ranks_local_features_merge_into_one_store(make_model, paths, tmp_path):
    """fol-region on the model's own head: one pass per rank, each rank its own store, merged."""
    from placerank.descriptors.extract import local_store_for
    from placerank.rerank.base import create_reranker

    fol = make_model("fol-effnet-lite0", image_size=(128, 160))  # FoL: > 64 patches
    reranker = create_reranker("fol-region", model=fol)
    few = paths[:5]
    single, _ = extract_to_folder(
        tmp_path / "single", fol, few, CPU, reranker, batch_size=2, num_workers=0, use_cache=False
    )
    folder = tmp_path / "db"
    for r in (0, 1):
        shards.extract_shard(fol, few, CPU, folder, r, 2, 2, 0, False, reranker, progress=False)
    merged = shards.merge_shards(folder, 2, fol, few, reranker)
    assert merged.local == single.local  # the same store recorded, relative to the folder
    np.testing.assert_array_equal(merged.descriptors, single.descriptors)
    a, b = local_store_for(reranker, tmp_path / "single" / "local"), local_store_for(reranker, folder / "local")
    try:
        assert len(a) == len(b) == 5
        for key in merged.keys:
            fa, fb = a.get(key), b.get(key)
            np.testing.assert_array_equal(fa.descriptors, fb.descriptors)
            np.testing.assert_array_equal(fa.keypoints, fb.keypoints)
            assert fa.image_size == fb.image_size
    finally:
        a.close()
        b.close()


def test_nproc_bounds():
    assert shards.check_nproc(1) == 1 and shards.check_nproc(64) == 64
    for bad in (0, -1, 65):
        with pytest.raises(PlaceRankError, match=rf"^--nproc must be a whole number from 1 to 64, got {bad}$"):
            shards.check_nproc(bad)
