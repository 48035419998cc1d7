"""Index kinds by FAISS factory string: exactness where the kind is exact, compression, options,
training-size and spec errors, save/load checks, on-disk lists, merging. Synthetic unit vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.index import spec as S
from placerank.index.factory import VPRIndex, build_index, merge_indexes
from placerank.index.flat import FlatIndex
from placerank.index.spec import default_train_size, train_rows


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    db = _unit(rng, 3000, 32)
    q = db[:100] + 0.2 * rng.normal(size=(100, 32)).astype(np.float32)
    return db, q / np.linalg.norm(q, axis=1, keepdims=True)


def test_flat_equals_flat_index_exactly(data):
    db, q = data
    idx = build_index(db, "flat", model="m", weights_id="w")
    sims, ids = idx.search(q, 10, chunk=7)
    ref_sims, ref_ids = FlatIndex.build(db).search(q, 10)
    assert (ids == ref_ids).all() and (sims == ref_sims).all()
    d = idx.describe()
    assert d["spec"] == "flat" and d["train_size"] == 0 and d["options"] == {}
    assert 32 * 4 <= d["bytes_per_image"] < 32 * 4 + 1  # 128 bytes a row plus a ~50-byte header


def test_memmap_input_gives_the_same_index(data, tmp_path):
    db, q = data
    mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float32, shape=db.shape)
    mm[:] = db
    mm.flush()
    ro = np.load(tmp_path / "d.npy", mmap_mode="r")
    a = build_index(ro, "IVF16,Flat", {"nprobe": "16"})
    b = build_index(db, "IVF16,Flat", {"nprobe": "16"})
    assert (a.search(q, 5)[1] == b.search(q, 5)[1]).all()


def test_ivf_with_all_lists_probed_is_exact(data):
    db, q = data
    idx = build_index(db, "IVF64,Flat", {"nprobe": "64"})
    _, ids = idx.search(q, 10)
    assert (ids == FlatIndex.build(db).search(q, 10)[1]).all()
    # training sample: 64 rows per list = 4096 > 3000 rows -> all of them, in order
    assert idx.schema.train_size == default_train_size(3000, 64) == 3000
    assert idx.options == {"nprobe": "64"}


def test_ivf1024_with_every_list_probed_is_exact():
    rng = np.random.default_rng(5)
    db, q = _unit(rng, 2048, 16), _unit(rng, 50, 16)
    idx = build_index(db, "IVF1024,Flat", {"nprobe": "1024"})
    assert idx.schema.train_size == 2048  # min(N, 64 * 1024)
    sims, ids = idx.search(q, 10)
    ref_sims, ref_ids = FlatIndex.build(db).search(q, 10)
    assert (ids == ref_ids).all()
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-6)


def test_default_training_sample_rule_and_rows():
    assert default_train_size(10**6, 1024) == 65536  # 64 per centroid
    assert default_train_size(10**6, 16) == 4096  # 10 000 capped at 256 per centroid
    assert default_train_size(10**6, 64) == 10_000
    assert default_train_size(500, 64) == 500
    rows = train_rows(100, 10)
    assert len(set(rows)) == 10 and (np.diff(rows) > 0).all() and (rows == train_rows(100, 10)).all()


def test_ivf_default_nprobe_and_flat_fp16_halves_bytes(data):
    db, q = data
    assert build_index(db, "IVF64,Flat").options == {"nprobe": "32"}
    half = build_index(db, "flat-fp16")
    assert half.describe()["bytes_per_image"] == pytest.approx(32 * 2, abs=1)
    assert (half.search(q, 1)[1] == FlatIndex.build(db).search(q, 1)[1]).all()


def test_ivf_pq_compresses_more_than_16x():
    rng = np.random.default_rng(3)
    db = _unit(rng, 4096, 512)
    flat = build_index(db, "flat").describe()["bytes_per_image"]
    pq = build_index(db, "IVF16,PQ16x4")
    assert pq.describe()["bytes_per_image"] < flat / 16  # 8 code + 8 id bytes + codebooks, vs 2048


def test_hnsw_search_options(data):
    db, q = data
    idx = build_index(db, "HNSW16", {"efSearch": "128"})
    assert idx.options == {"efSearch": "128"}
    top = idx.search(q, 1)[1][:, 0]
    assert (top == FlatIndex.build(db).search(q, 1)[1][:, 0]).mean() >= 0.95
    # efSearch < k: FAISS alone finds fewer than k rows; the search raises efSearch to k, then restores it
    low = build_index(db, "HNSW16", {"efSearch": "4"})
    assert (low.search(q, 100)[1] >= 0).all() and S.hnsw_of(low.index).efSearch == 4


def test_bad_spec_option_and_too_few_to_train_are_one_line_errors(data):
    db, _ = data
    with pytest.raises(
        PlaceRankError,
        match=r"^index spec 'IVFfoo' is not valid: FAISS says 'could not parse index string IVFfoo' \(use flat",
    ):
        build_index(db, "IVFfoo")
    msg = (
        "index 'IVF1024,Flat' needs at least 1024 descriptors to train (its k-means has 1024 centroids), "
        "got 500 database descriptors: index more images, use fewer lists (e.g. IVF16,Flat) or --index flat"
    )
    with pytest.raises(PlaceRankError) as e:
        build_index(db[:500], "IVF1024,Flat")
    assert str(e.value) == msg
    with pytest.raises(PlaceRankError) as e:
        build_index(db, "IVF16,Flat", {"efSearch": "3"})
    assert str(e.value) == "index 'IVF16,Flat' has no option 'efSearch': its options are max_codes, nprobe"
    with pytest.raises(PlaceRankError, match=r"^index 'flat' has no option 'nprobe': its options are none"):
        build_index(db, "flat", {"nprobe": "3"})
    with pytest.raises(PlaceRankError, match=r"^index option nprobe=x: the value must be a number$"):
        build_index(db, "IVF16,Flat", {"nprobe": "x"})


def test_save_load_checks_spec_and_keeps_options(data, tmp_path):
    db, q = data
    idx = build_index(db, "IVF16,Flat", {"nprobe": "4"}, model="m", weights_id="w")
    idx.save(tmp_path / "i")
    meta = json.loads((tmp_path / "i" / "index.json").read_text())
    assert {k: meta[k] for k in ("spec", "options", "train_size", "count", "dimension", "model")} == {
        "spec": "IVF16,Flat",
        "options": {"nprobe": "4"},
        "train_size": 3000,
        "count": 3000,
        "dimension": 32,
        "model": "m",
    }
    back = VPRIndex.load(tmp_path / "i", model="m", weights_id="w", dimension=32, spec="IVF16,Flat")
    assert back.options == {"nprobe": "4"} and (back.search(q, 5)[1] == idx.search(q, 5)[1]).all()
    assert VPRIndex.load(tmp_path / "i", options={"nprobe": "16"}).options == {"nprobe": "16"}
    with pytest.raises(IndexMismatchError) as e:
        VPRIndex.load(tmp_path / "i", spec="flat")
    assert str(e.value) == (
        f"{tmp_path / 'i'}: index was built as 'IVF16,Flat', not 'flat': rebuild it with --index flat "
        "or use --index IVF16,Flat"
    )
    with pytest.raises(IndexMismatchError, match="index was built with model 'm', not 'other'$"):
        VPRIndex.load(tmp_path / "i", model="other")


def test_old_flat_index_folder_loads_as_flat(data, tmp_path):
    db, q = data
    FlatIndex.build(db, "m", "w").save(tmp_path / "old")
    idx = VPRIndex.load(tmp_path / "old", model="m", spec="flat")
    assert (idx.search(q, 3)[1] == FlatIndex.build(db).search(q, 3)[1]).all()


def test_on_disk_ivf_equals_in_ram_ivf(data, tmp_path):
    db, q = data
    ram = build_index(db, "IVF32,Flat", {"nprobe": "8"})
    disk = build_index(db, "IVF32,Flat", {"nprobe": "8"}, on_disk=tmp_path / "d")
    disk.save(tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files[1:] == ["index.faiss", "index.json"] and files[0].endswith(".ivfdata")
    loaded = VPRIndex.load(tmp_path / "d", spec="IVF32,Flat")
    for idx in (disk, loaded):
        sims, ids = idx.search(q, 10)
        ram_sims, ram_ids = ram.search(q, 10)
        assert (ids == ram_ids).all() and (sims == ram_sims).all()
    # the folder moves as a whole: the lists are found beside index.faiss
    (tmp_path / "d").rename(tmp_path / "moved")
    assert (VPRIndex.load(tmp_path / "moved").search(q, 10)[1] == ram.search(q, 10)[1]).all()
    with pytest.raises(PlaceRankError, match="on-disk inverted lists need an IVF index"):
        build_index(db, "HNSW16", on_disk=tmp_path / "h")
    # the on_disk=1 option: the same, in a scratch folder that goes with the index
    scratch = build_index(db, "IVF32,Flat", {"nprobe": "8", "on_disk": "1"})
    assert scratch.describe()["on_disk"] and scratch.options == {"nprobe": "8"}
    assert (scratch.search(q, 10)[1] == ram.search(q, 10)[1]).all()
    folder = scratch.folder
    assert folder is not None and any(folder.glob("*.ivfdata"))
    del scratch
    assert not folder.exists()


def test_merge_flat_parts_and_shard_hnsw(data):
    db, q = data
    whole = FlatIndex.build(db).search(q, 10)[1]
    merged = merge_indexes([build_index(db[:1000]), build_index(db[1000:])])
    assert len(merged) == 3000 and (merged.search(q, 10)[1] == whole).all()
    shards = merge_indexes([build_index(db[:1000], "HNSW16"), build_index(db[1000:], "HNSW16")])
    assert len(shards) == 3000 and (shards.search(q, 1)[1][:, 0] == whole[:, 0]).mean() >= 0.95
    with pytest.raises(PlaceRankError, match="cannot be saved"):
        shards.save("/nonexistent")
    with pytest.raises(IndexMismatchError, match="cannot merge an index of flat-fp16"):
        merge_indexes([build_index(db[:10]), build_index(db[:10], "flat-fp16")])


def test_cuda_device_searches_the_gpu_copy_once_and_falls_back(data, monkeypatch):
    """faiss-gpu is not installed here: a stand-in copy shows the GPU path is taken, cached per
    device, skipped past k = 2048, and that without a copy the CPU answers the same."""
    import faiss

    import placerank.index.factory as factory

    db, q = data
    copies = []
    monkeypatch.setattr(factory, "gpu_copy", lambda index, device: copies.append(device) or faiss.clone_index(index))
    idx = build_index(db, "IVF16,Flat", {"nprobe": "16"})
    cpu = idx.search(q, 10)
    gpu = idx.search(q, 10, device="cuda:0")
    assert idx.searched_on == "gpu" and (gpu[1] == cpu[1]).all()
    idx.search(q, 10, device="cuda:0")
    assert copies == ["cuda:0"]  # one copy per device, kept
    idx.search(q, 2049, device="cuda:0")
    assert idx.searched_on == "cpu"
    monkeypatch.setattr(factory, "gpu_copy", lambda index, device: None)
    fresh = build_index(db, "flat")
    assert (fresh.search(q, 5, device="cuda:0")[1] == FlatIndex.build(db).search(q, 5)[1]).all()
    assert fresh.searched_on == "cpu"
