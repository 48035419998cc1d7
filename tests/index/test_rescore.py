"""The OPQ training guard (FAISS crashes the process below it) and ``rescore=K``: exact re-scoring
of a compressed index's candidates from the database descriptors. Synthetic unit vectors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from placerank.errors import PlaceRankError
from placerank.index import spec as S
from placerank.index.factory import VPRIndex, build_index
from placerank.index.flat import FlatIndex


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def clustered():
    """2 000 database rows around 40 places (tight clusters, as images of a place are), 200
    queries = noisy copies of database rows: the query's own row is its true match."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 64))
    db = _unit(centres[rng.integers(0, 40, 2000)] + 0.35 * rng.normal(size=(2000, 64)))
    truth = rng.choice(2000, 200, replace=False)
    q = _unit(db[truth] + 0.02 * rng.normal(size=(200, 64)))
    return db, q, truth


def test_opq_guard_is_one_line_before_faiss_crashes():
    # 1 000 x 1280-d: FAISS 1.15 segfaults in OPQ training (measured in a subprocess); we refuse first
    db = np.zeros((1000, 1280), dtype=np.float32)
    db[:, 0] = 1.0
    msg = (
        "index 'OPQ64,IVF16,PQ64' needs at least 1280 training vectors, got 1000: its OPQ rotation is trained "
        "on 1280-d descriptors and FAISS crashes on fewer rows than dimensions; index more images or drop OPQ "
        "(e.g. IVF16,PQ64)"
    )
    with pytest.raises(PlaceRankError, match=f"^{re.escape(msg)}$"):
        build_index(db, "OPQ64,IVF16,PQ64")
    with pytest.raises(PlaceRankError, match="needs at least 1280 training vectors, got 1000"):
        S.check_spec("OPQ64,IVF16,PQ64", None, 1280, 1000)  # eval checks before extracting
    idx = S.make_index(1280, "OPQ64,IVF16,PQ64")
    assert S.opq_min_rows(idx) == 1280 and S.opq_min_rows(S.make_index(1280, "IVF16,PQ64")) == 0
    assert S.opq_min_rows(S.make_index(32, "OPQ8,Flat")) == 256  # the 256-entry codebooks


def test_rescore_of_all_rows_equals_flat_exactly(clustered):
    db, q, _ = clustered
    idx = build_index(db, "IVF8,PQ8", {"nprobe": "8", "rescore": "2000"})
    sims, ids = idx.search(q, 10)
    ref_sims, ref_ids = FlatIndex.build(db).search(q, 10)
    assert (ids == ref_ids).all()
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)  # BLAS vs einsum rounding only
    # the recorded options
    assert idx.options == {"nprobe": "8", "rescore": "2000"}
    assert idx.describe()["options"]["rescore"] == "2000"


def test_rescore_wins_back_recall(clustered, tmp_path):
    db, q, truth = clustered
    flat = (FlatIndex.build(db).search(q, 1)[1][:, 0] == truth).mean()
    pq = build_index(db, "IVF8,PQ4", {"nprobe": "8"})
    plain = (pq.search(q, 1)[1][:, 0] == truth).mean()
    pq.set_options({"rescore": "50"})
    sims, ids = pq.search(q, 5)
    rescored = (ids[:, 0] == truth).mean()
    assert flat == 1.0 and plain < 0.5 and rescored == 1.0, (flat, plain, rescored)
    assert (np.diff(sims, axis=1) <= 0).all()  # best first
    # saved: rescore is in index.json; a loaded index needs its descriptors given back
    pq.save(tmp_path / "i")
    back = VPRIndex.load(tmp_path / "i")
    assert back.options["rescore"] == "50"
    with pytest.raises(PlaceRankError, match="has rescore=50 but no database descriptors"):
        back.search(q, 5)
    back.descriptors = db
    assert (back.search(q, 5)[1] == ids).all()


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        ("IVF8,PQ4", "0", "index option rescore=0: must be a whole number of candidates >= 1, e.g. 100"),
        ("IVF8,PQ4", "2.5", "index option rescore=2.5: must be a whole number of candidates >= 1, e.g. 100"),
        ("IVF8,PQ4", "x", "index option rescore=x: the value must be a number"),
        ("flat", "10", "index option rescore is for approximate kinds (IVF, PQ, HNSW ...): flat is exact already"),
    ],
)
def test_bad_rescore_is_one_line(clustered, spec, value, message):
    db, _, _ = clustered
    with pytest.raises(PlaceRankError, match=f"^{re.escape(message)}$"):
        build_index(db, spec, {"rescore": value})
    with pytest.raises(PlaceRankError, match=f"^{re.escape(message)}$"):
        S.check_spec(spec, {"rescore": value}, 64)


def test_localize_database_refuses_rescore():
    with pytest.raises(PlaceRankError, match="rescore is only supported by eval and search"):
        S.apply_options(S.make_index(64, "IVF8,PQ4"), {"rescore": "10"}, "IVF8,PQ4")
