"""A database written by placerank before the index moved to ``placerank.index.idmap`` (no
``index.json`` beside ``index.g<N>.faiss``) keeps working: the new code opens it, localizes with
the stored descriptors and local features, upgrades the index files in place, and adds photos.

The old layout is written here by hand, byte for byte as the old ``localize/database.py`` wrote it
(SQLite schema and meta rows, FAISS IndexIDMap2(IndexFlatIP) file named by generation, the
re-ranker's LocalFeatureStore keyed by sha256), so this test does not depend on old code."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import placerank
from placerank.data.images import load_tensor
from placerank.descriptors.cache import namespace
from placerank.descriptors.local_store import LocalFeatureStore
from placerank.models import create as create_model
from placerank.rerank.base import create_reranker

SIZE = (120, 160)

# Verbatim from the old placerank/localize/database.py (format 1).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    lat REAL, lon REAL, easting REAL, northing REAL, epsg INTEGER,
    position_source TEXT NOT NULL,
    height INTEGER, width INTEGER,
    descriptor BLOB NOT NULL,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
"""


def _write_old_database(folder: Path, model, photos: list[tuple[Path, float, float]], reranker) -> None:
    folder.mkdir(parents=True)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    con = sqlite3.connect(folder / "placerank.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("BEGIN IMMEDIATE")
    for statement in OLD_SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)
    meta = {
        "format": "1",
        "created": now,
        "model": model.name,
        "weights_id": model.weights_id,
        "weights_source": model.weights_source,
        "weights_path": "",
        "descriptor_dim": str(model.descriptor_dim),
        "preprocess": model.preprocess.signature(),
        "image_size": f"{model.preprocess.size[0]},{model.preprocess.size[1]}",
        "frame": "",
        "radius": repr(0.3),
        "generation": "0",
        "rerankers": "{}",
    }
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
    con.execute("COMMIT")
    # One transaction for the batch, generation 0 -> 1; then the index file of generation 1.
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(model.descriptor_dim))
    store = LocalFeatureStore(
        folder / "local" / namespace(reranker.name, reranker.signature()), reranker.signature(), reranker.dim
    )
    con.execute("BEGIN IMMEDIATE")
    ids, vecs = [], []
    for path, east, north in photos:
        tensor, (h, w) = load_tensor(path, model.preprocess)
        with torch.inference_mode():
            desc = model(tensor[None]).float().numpy()[0]
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        st = path.stat()
        cur = con.execute(
            "INSERT INTO images (path, sha256, mtime_ns, size, lat, lon, easting, northing, epsg, "
            "position_source, height, width, descriptor, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (str(path), sha, st.st_mtime_ns, st.st_size, None, None, east, north, None, "csv:old.csv", h, w,
             desc.tobytes(), now),
        )  # fmt: skip
        ids.append(cur.lastrowid)
        vecs.append(desc)
        lt, orig = load_tensor(path, reranker.preprocess)
        store.add(sha, reranker.extract(lt[None], [orig])[0])
    con.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")
    con.execute("UPDATE meta SET value=? WHERE key='frame'", ("local",))
    con.execute("UPDATE meta SET value=? WHERE key='rerankers'", (json.dumps({reranker.name: reranker.signature()}),))
    con.execute("COMMIT")
    con.close()
    store.close()
    index.add_with_ids(np.stack(vecs), np.array(ids, dtype=np.int64))
    faiss.write_index(index, str(folder / "index.g1.faiss"))
    (folder / "write.lock").write_text("")


@pytest.fixture(scope="module")
def old_db(shared_data, tmp_path_factory, shared_weights):
    base = shared_data / "tum_rgbd_fr1_desk"
    rows = [r for r in csv.DictReader(open(base / "poses.csv")) if r["split"] == "database"]
    root = tmp_path_factory.mktemp("old_layout")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        model = create_model("effnet-lite0-gem", image_size=SIZE).eval()
        reranker = create_reranker("ransac-xfeat", image_size=SIZE)  # as the old code built it
    photos = [(base / r["file"], float(r["tx"]), float(r["ty"])) for r in rows[0:120:8]]
    _write_old_database(root / "db", model, photos, reranker)
    with open(root / "more.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "easting", "northing"])
        for r in rows[4:120:8]:
            w.writerow([str(base / r["file"]), r["tx"], r["ty"]])
    return {"db": root / "db", "more": root / "more.csv", "model": model, "photos": photos, "base": base}


def test_old_database_opens_localizes_upgrades_and_grows(old_db):
    db_path, model = old_db["db"], old_db["model"]
    assert sorted(p.name for p in db_path.iterdir()) == ["index.g1.faiss", "local", "placerank.sqlite", "write.lock"]
    query = old_db["base"] / "queries" / "0400_1305031466.127640.jpg"
    # What the old database answers: brute force over its stored descriptors.
    con = sqlite3.connect(db_path / "placerank.sqlite")
    stored = con.execute("SELECT path, descriptor FROM images ORDER BY id").fetchall()
    con.close()
    tensor, _ = load_tensor(query, model.preprocess)
    with torch.inference_mode():
        q = model(tensor[None]).float().numpy()[0]
    sims = np.array([np.frombuffer(blob, np.float32) @ q for _, blob in stored])
    expected = [stored[j][0] for j in np.argsort(-sims)[:5]]

    with placerank.Database.open(db_path) as db:  # stored model name, weights and input size
        info = db.info()
        assert (info["images"], info["frame"], info["generation"], info["radius_m"]) == (15, "local", 1, 0.3)
        res = db.localize(query, top_k=5)
        assert db.store.index_rebuilt  # no index.json: rebuilt from the stored descriptors, saved in the new layout
        assert [m.path for m in res.matches] == expected
        assert [m.similarity for m in res.matches] == pytest.approx(sorted(sims, reverse=True)[:5], abs=1e-4)
        assert res.found and res.frame == "local"
        rr = db.localize(query, top_k=5, rerank="ransac-xfeat", rerank_options={"image_size": SIZE})
        assert not any("extracted now" in n for n in rr.notes)  # the old local-feature store is read as it is
        scores = [m.rerank_score for m in rr.matches]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0
    schema = json.loads((db_path / "index.json").read_text())
    assert (schema["generation"], schema["count"], schema["model"]) == (1, 15, "effnet-lite0-gem")
    assert sorted(p.name for p in db_path.glob("index.g*.faiss")) == ["index.g1.faiss"]

    with placerank.Database.open(db_path) as db:
        db.store.index()
        assert not db.store.index_rebuilt  # upgraded once, in place
        rep = db.add_folder(positions=old_db["more"], progress=False)
        assert len(rep.added) == 15 and rep.unchanged == 0 and rep.failed == []
        assert len(db) == 30 and len(db.store.index()) == 30
        gen = int(db.meta()["generation"])
        assert gen > 1 and [p.name for p in db_path.glob("index.g*.faiss")] == [f"index.g{gen}.faiss"]
        again = db.localize(query, top_k=5)
        assert again.found and again.database_size == 30
        old_in_top = [m.path for m in again.matches if m.path in {p for p, _ in stored}]
        assert old_in_top == expected[: len(old_in_top)]  # the old photos still rank as before
        rep = db.add_folder(positions=old_db["more"], progress=False)  # nothing new
        assert rep.unchanged == 15 and rep.extracted == 0
