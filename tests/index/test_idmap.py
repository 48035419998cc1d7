"""The id-mapped, generation-stamped index: ids survive add/remove and a save/load round trip;
a saved index is used only when schema, file and ids all agree with the owner; anything else
(another generation, model, weights or dimension, a damaged or missing file, a missing schema,
other ids) is rebuilt from the owner's descriptors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.index.idmap import IdMapIndex, IdMapSchema, index_file, read_schema

DIM = 8


def _rows(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(100, 100 + 3 * n, 3, dtype=np.int64)  # sparse ids, as SQLite rows after deletes
    return ids, v


def _expected(ids, generation=5) -> IdMapSchema:
    return IdMapSchema(DIM, "m", "w1", len(ids), generation)


def test_ids_add_remove_and_search():
    ids, v = _rows()
    index = IdMapIndex.build(DIM, [(ids[:10], v[:10]), (ids[10:], v[10:])], "m", "w1", generation=1)
    assert len(index) == 20 and np.array_equal(index.ids(), ids)
    sims, found = index.search(v[[3, 17]], 4)
    assert found[:, 0].tolist() == [ids[3], ids[17]]
    assert sims[:, 0] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    brute = v @ v[3]
    assert sims[0].tolist() == pytest.approx(np.sort(brute)[::-1][:4].tolist(), abs=1e-5)
    index.remove([ids[3], ids[5]])
    assert len(index) == 18 and index.schema.count == 18
    assert ids[3] not in index.search(v[[3]], 18)[1][0]
    assert index.search(v[[0]], 100)[1].shape == (1, 18)  # k capped at the size
    with pytest.raises(IndexMismatchError) as e:
        index.add([1], np.zeros((1, DIM + 1), np.float32))
    assert str(e.value) == f"descriptors are {DIM + 1}-d but the index is {DIM}-d"
    with pytest.raises(PlaceRankError):
        IdMapIndex(DIM).search(v[:1], 1)


def test_save_writes_schema_and_one_generation(tmp_path):
    ids, v = _rows()
    index = IdMapIndex.build(DIM, [(ids, v)], "m", "w1", generation=4)
    index.save(tmp_path)
    index.remove(ids[:2])
    index.generation = 5
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.g5.faiss", "index.json"]
    assert json.loads((tmp_path / "index.json").read_text()) == {
        "dimension": DIM,
        "model": "m",
        "weights_id": "w1",
        "count": 18,
        "generation": 5,
        "kind": "idmap-flat-ip",
        "format": 1,
        "spec": "flat",
        "options": {},
    }
    loaded = IdMapIndex.load(tmp_path, _expected(ids[2:]), ids[2:])
    assert loaded is not None and np.array_equal(loaded.ids(), ids[2:])
    assert loaded.search(v[[7]], 1)[1][0, 0] == ids[7]


def test_out_of_sync_index_is_rebuilt_from_the_owner(tmp_path):
    ids, v = _rows()
    IdMapIndex.build(DIM, [(ids, v)], "m", "w1", generation=5).save(tmp_path)
    calls = []

    def chunks():
        calls.append(1)
        yield ids, v

    index, rebuilt = IdMapIndex.open(tmp_path, _expected(ids), ids, chunks)
    assert not rebuilt and calls == [] and len(index) == 20
    good_schema = (tmp_path / "index.json").read_text()
    good_bytes = index_file(tmp_path, 5).read_bytes()

    cases = {
        "newer generation": (replace(_expected(ids), generation=6), ids),
        "other model": (replace(_expected(ids), model="x"), ids),
        "other weights": (replace(_expected(ids), weights_id="w2"), ids),
        "other dimension": (replace(_expected(ids), dimension=DIM * 2), ids),
        "other count": (replace(_expected(ids), count=19), ids[:19]),
        "other ids": (_expected(ids), ids + 1),
    }
    for name, (expected, want_ids) in cases.items():
        assert IdMapIndex.load(tmp_path, expected, want_ids) is None, name
    for damage in ("garbage", "no schema", "bad schema", "missing"):
        (tmp_path / "index.json").write_text(good_schema)
        index_file(tmp_path, 5).write_bytes(good_bytes)
        if damage == "garbage":
            index_file(tmp_path, 5).write_bytes(b"\x00not faiss" * 20)
        elif damage == "no schema":
            (tmp_path / "index.json").unlink()
        elif damage == "bad schema":
            (tmp_path / "index.json").write_text('{"dimension": 8}')
            assert read_schema(tmp_path) is None
        else:
            index_file(tmp_path, 5).unlink()
        calls.clear()
        index, rebuilt = IdMapIndex.open(tmp_path, _expected(ids), ids, chunks)
        assert rebuilt and calls == [1], damage
        assert np.array_equal(index.ids(), ids) and index.generation == 5
        assert index.search(v[[11]], 1)[1][0, 0] == ids[11]


def test_trained_kind_over_ids_and_hnsw_asks_for_a_rebuild(tmp_path):
    rng = np.random.default_rng(4)
    v = rng.normal(size=(400, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(1000, 1400, dtype=np.int64)

    def chunks():
        return [(ids[:150], v[:150]), (ids[150:], v[150:])]

    ivf = IdMapIndex.build(DIM, chunks, "m", "w1", 2, spec="IVF8,Flat", options={"nprobe": "8"}, count=400)
    exact = IdMapIndex.build(DIM, chunks(), "m", "w1", 2)
    assert np.array_equal(ivf.search(v[:30], 5)[1], exact.search(v[:30], 5)[1])  # all lists probed: exact
    assert ivf.remove(ids[:3]) and len(ivf) == 397
    ivf.save(tmp_path)
    expected = replace(IdMapSchema(DIM, "m", "w1", 397, 2), spec="IVF8,Flat", options={"nprobe": "2"})
    loaded = IdMapIndex.load(tmp_path, expected, ids[3:])
    assert loaded is not None and loaded.schema.options == {"nprobe": "2"}  # options apply, no rebuild
    assert IdMapIndex.load(tmp_path, replace(expected, spec="flat"), ids[3:]) is None  # another kind: rebuild
    hnsw = IdMapIndex.build(DIM, chunks(), spec="HNSW8")
    assert hnsw.remove(ids[:1]) is False and len(hnsw) == 400
    with pytest.raises(PlaceRankError, match=r"^index 'IVF512,Flat' needs at least 512 descriptors to train"):
        IdMapIndex.build(DIM, chunks, spec="IVF512,Flat", count=400)
