"""FAISS flat index: search correctness, chunking, validated save/load."""

from __future__ import annotations

import numpy as np
import pytest

from placerank.errors import IndexMismatchError, PlaceRankError
from placerank.index.flat import FlatIndex


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_chunked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 500, 32), _unit(rng, 77, 32)
    idx = FlatIndex.build(db, "m", "w")
    sims, ids = idx.search(q, 10, chunk=16)
    brute = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :10]
    assert (ids == brute).all()
    np.testing.assert_allclose(sims, np.take_along_axis(q @ db.T, brute, 1), rtol=1e-5)


def test_k_is_capped_at_index_size_and_empty_index_refused():
    rng = np.random.default_rng(1)
    idx = FlatIndex.build(_unit(rng, 3, 8))
    assert idx.search(_unit(rng, 2, 8), 10)[1].shape == (2, 3)
    with pytest.raises(PlaceRankError, match="the database index is empty"):
        FlatIndex(8).search(_unit(rng, 1, 8), 1)


def test_save_load_validates_schema(tmp_path):
    rng = np.random.default_rng(2)
    db = _unit(rng, 40, 16)
    FlatIndex.build(db, "effnet-lite0-gem", "abc").save(tmp_path / "idx")
    loaded = FlatIndex.load(tmp_path / "idx", model="effnet-lite0-gem", weights_id="abc", dimension=16)
    assert len(loaded) == 40
    assert (loaded.search(db[:5], 1)[1][:, 0] == np.arange(5)).all()
    with pytest.raises(IndexMismatchError, match=r"index was built with model 'effnet-lite0-gem', not 'other'$"):
        FlatIndex.load(tmp_path / "idx", model="other")
    with pytest.raises(IndexMismatchError, match="index was built with other weights"):
        FlatIndex.load(tmp_path / "idx", weights_id="zzz")
    with pytest.raises(IndexMismatchError, match="index is 16-d but the model gives 32-d"):
        FlatIndex.load(tmp_path / "idx", dimension=32)
    with pytest.raises(IndexMismatchError, match="descriptors are 8-d but the index is 16-d"):
        loaded.add(_unit(rng, 2, 8))
    with pytest.raises(PlaceRankError, match="not a placerank index"):
        FlatIndex.load(tmp_path / "nothing")
