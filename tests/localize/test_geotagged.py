"""`placerank index` / `placerank localize` on the real EXIF-GPS photos (Berlin, Arezzo).

The database is built from a copy of geotagged_photos with two photos held out: Berlin 01.jpg
(its two neighbours 02/03 are 6-18 m away and overlap visually) and Arezzo DSCN0038.jpg (no
database photo within 25 m)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import placerank
from placerank.cli import main
from placerank.data.exif import read_gps
from placerank.errors import DataError, IndexMismatchError, PlaceRankError
from placerank.localize import write_outputs
from placerank.models import create as create_model


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _snapshot(folder: Path) -> dict:
    return {
        str(p): (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared_data, shared_weights, shared_copy, make_model):
    src = shared_data / "geotagged_photos"
    root = tmp_path_factory.mktemp("geotagged")
    photos, held, bad = root / "photos", root / "held", root / "bad"
    copy = shared_copy("geotagged_photos")
    photos.mkdir()
    for folder in ("opensfm_berlin", "exif_samples_arezzo"):  # the photos, not the README / CSVs
        shutil.move(copy / folder, photos / folder)
    held.mkdir()
    shutil.move(photos / "opensfm_berlin/01.jpg", held / "01.jpg")
    shutil.move(photos / "exif_samples_arezzo/DSCN0038.jpg", held / "DSCN0038.jpg")
    bad.mkdir()
    raw = (src / "opensfm_berlin/02.jpg").read_bytes()
    tiff = raw.find(b"Exif\x00\x00") + 6
    damaged = bytearray(raw)
    damaged[tiff : tiff + 2] = b"XX"
    (bad / "corrupt_exif.jpg").write_bytes(bytes(damaged))
    shutil.copy2(next((shared_data / "tum_rgbd_fr1_desk/database").glob("*.jpg")), bad / "no_gps.jpg")
    (bad / "not_an_image.jpg").write_text("this is not a JPEG\n")
    raw3 = (src / "opensfm_berlin/03.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(raw3[: len(raw3) * 6 // 10])  # EXIF intact, pixels cut

    before = _snapshot(root)
    db = root / "db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        rc, out, err = _run_cli(["index", str(photos), "--db", str(db), "--quiet"])
    model = make_model("effnet-lite0-gem")
    assert rc == 0, err
    return {
        "root": root,
        "photos": photos,
        "held": held,
        "bad": bad,
        "db": db,
        "index_stdout": out,
        "before": before,
        "model": model,
    }


def test_index_stores_exif_positions_hashes_and_model(site):
    out = site["index_stdout"]
    assert "extracting 10 photo(s) with effnet-lite0-gem" in out
    assert out.strip().endswith("10 added, 0 updated, 0 unchanged; 10 images in the database")
    con = sqlite3.connect(site["db"] / "placerank.sqlite")
    rows = con.execute(
        "SELECT path, sha256, mtime_ns, lat, lon, easting, northing, epsg, position_source, "
        "length(descriptor) FROM images ORDER BY path"
    ).fetchall()
    meta = dict(con.execute("SELECT key, value FROM meta"))
    con.close()
    assert len(rows) == 10
    for path, sha, mtime, lat, lon, e, n, epsg, source, nbytes in rows:
        p = Path(path)
        g = read_gps(p)
        assert (lat, lon) == (g.lat, g.lon) and source == "exif" and nbytes == 1280 * 4
        assert sha == hashlib.sha256(p.read_bytes()).hexdigest() and mtime == p.stat().st_mtime_ns
        assert epsg == (32633 if "berlin" in path else 32632)
    berlin02 = next(r for r in rows if r[0].endswith("02.jpg"))
    assert berlin02[5:7] == pytest.approx((391463.77, 5819959.52), abs=0.02)  # positions.csv utm_east/north
    m = site["model"]
    assert (meta["model"], meta["weights_id"], meta["frame"], meta["generation"]) == (
        "effnet-lite0-gem",
        m.weights_id,
        "wgs84",
        "1",
    )
    assert meta["image_size"] == "360,640" and float(meta["radius"]) == 25.0
    assert [p.name for p in site["db"].glob("index.g*.faiss")] == ["index.g1.faiss"]


def test_localize_held_out_photos_cli(site):
    out_dir = site["root"] / "out"
    rc, out, err = _run_cli(
        [
            "localize",
            str(site["held"] / "01.jpg"),
            str(site["held"] / "DSCN0038.jpg"),
            "--db",
            str(site["db"]),
            "--out",
            str(out_dir),
        ]
    )
    assert rc == 0, err
    r = json.loads((out_dir / "01.json").read_text())
    truth = read_gps(site["held"] / "01.jpg")
    # Measured: 6.49 m from 01.jpg's own EXIF GPS (its neighbour 02.jpg is 6.5 m away), confidence 1.0.
    assert r["query_gps"]["error_m"] < 25.0
    assert r["query_gps"]["lat"] == truth.lat and r["utm_zone"] == "33N"
    assert Path(r["matches"][0]["path"]).name == "02.jpg" and r["matches"][0]["agrees"]
    assert [Path(m["path"]).name for m in r["matches"] if m["agrees"]] == ["02.jpg", "03.jpg"]
    assert r["confidence"] >= 0.9 and r["frame"] == "wgs84" and len(r["matches"]) == 10
    assert all(m["distance_m"] > 1e5 for m in r["matches"] if not m["agrees"])  # Arezzo is 1000 km away
    assert "01.jpg: 52.5189" in out and "the photo's own EXIF GPS" in out
    # The held-out Arezzo photo has no database photo within 25 m (nearest: DSCN0029, 136 m):
    # whatever it matches, the estimate must stay in Arezzo, and be less certain than Berlin's.
    a = json.loads((out_dir / "DSCN0038.json").read_text())
    assert a["utm_zone"] == "32N" and a["query_gps"]["error_m"] < 600
    assert a["confidence"] < r["confidence"]
    for stem in ("01", "DSCN0038"):
        with Image.open(out_dir / f"{stem}_matches.png") as im:
            assert im.size[0] > 5 * im.size[1] // 2
        with Image.open(out_dir / f"{stem}_map.png") as im:
            assert im.size[0] >= 500 and im.size[1] >= 500
    lines = (out_dir / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("photo,lat,lon,easting,northing")


def test_localize_with_ransac_rerank_uses_stored_local_features(site):
    from placerank.rerank.base import list_rerankers

    assert "ransac-xfeat" in [e.name for e in list_rerankers()]
    db = placerank.Database.open(site["db"], model=site["model"])
    with db:
        rep = db.add_folder(site["photos"], rerank="ransac-xfeat", progress=False)
        assert rep.extracted == 0 and rep.unchanged == 10 and rep.local_extracted == 10
        stores = list((site["db"] / "local").glob("ransac-xfeat-*/meta.json"))
        assert len(stores) == 1  # the local-feature store lives inside the database folder
        res = db.localize(site["held"] / "01.jpg", rerank="ransac-xfeat", top_k=5)
        written = write_outputs(db, res, site["root"] / "out_rerank")
    assert not any("extracted now" in n for n in res.notes)
    top = res.matches[0]
    # Measured: 601 MAGSAC inliers 01->02, 249 01->03, <= 33 for Arezzo photos.
    assert Path(top.path).name == "02.jpg" and top.rerank_score > 150
    assert all(m.rerank_score < 80 for m in res.matches if "arezzo" in m.path)
    assert res.query_gps.error_m < 25.0 and res.confidence > 0.9
    assert [p.name for p in written] == ["01.json", "01_matches.png", "01_inliers.png", "01_map.png"]


def test_bad_files_get_one_line_reasons(site):
    db = placerank.Database.open(site["db"], model=site["model"])
    with db:
        rep = db.add_folder(site["bad"], progress=False)
        assert len(db) == 10
    bad = site["bad"]
    failed = dict(rep.failed)
    assert (
        failed[str(bad / "corrupt_exif.jpg")]
        == f"{bad / 'corrupt_exif.jpg'}: EXIF block is damaged (invalid TIFF byte-order mark)"
    )
    assert failed[str(bad / "not_an_image.jpg")] == (
        f"{bad / 'not_an_image.jpg'}: cannot read image (UnidentifiedImageError: cannot identify image file "
        f"'{bad / 'not_an_image.jpg'}')"
    )
    assert failed[str(bad / "truncated.jpg")].startswith(f"{bad / 'truncated.jpg'}: cannot read image (OSError: ")
    assert "truncated" in failed[str(bad / "truncated.jpg")]
    assert dict(rep.no_position) == {
        str(bad / "no_gps.jpg"): (
            f"{bad / 'no_gps.jpg'}: no EXIF metadata; skipped (give --positions CSV or --allow-no-gps)"
        )
    }
    assert rep.added == [] and rep.summary() == (
        "0 added, 0 updated, 0 unchanged, 1 skipped (no position), 3 failed; 10 images in the database"
    )


def test_another_model_or_weights_is_refused(site, shared_weights, monkeypatch):
    db = site["db"].resolve()
    rc, _, err = _run_cli(
        [
            "localize",
            str(site["held"] / "01.jpg"),
            "--db",
            str(db),
            "--out",
            str(site["root"] / "x"),
            "--model",
            "effnet-lite0-netvlad",
        ]
    )
    assert rc == 2
    assert err == (
        f"placerank: error: {db}: database was built with model 'effnet-lite0-gem', not "
        f"'effnet-lite0-netvlad'; use a new --db for another model\n"
    )
    rc, _, err = _run_cli(["index", str(site["photos"]), "--db", str(db), "--image-size", "240", "320"])
    assert rc == 2 and err == f"placerank: error: {db}: database was built at image size 360x640, not 240x320\n"
    with pytest.raises(PlaceRankError) as e:  # k-means init is data-dependent: could never be reopened
        placerank.Database.create(site["root"] / "netvlad.db", model="effnet-lite0-netvlad")
    assert str(e.value) == (
        "model 'effnet-lite0-netvlad' needs data-driven initialisation (NetVLAD k-means) before a "
        "database can store its descriptors; train or initialise it, save a placerank checkpoint "
        "and pass it with --weights"
    )
    assert not (site["root"] / "netvlad.db").exists()
    other = create_model("effnet-lite0-gem", pretrained=False)  # same name, other weights
    with pytest.raises(IndexMismatchError) as e:
        placerank.Database.open(db, model=other)
    assert str(e.value) == (
        f"{db}: database was built with other weights (id {site['model'].weights_id}) than the "
        f"ones given ({other.weights_id}, random-init); use the original weights or a new --db"
    )


def test_incremental_reindex_touches_only_new_or_changed_files(site, tmp_path, monkeypatch):
    import placerank.descriptors.extract as extract_mod

    src = site["photos"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("opensfm_berlin/02.jpg", "opensfm_berlin/03.jpg", "exif_samples_arezzo/DSCN0010.jpg"):
        shutil.copy2(src / name, photos / Path(name).name)
    decoded: list[list[str]] = []
    real = extract_mod.make_loader

    def spy(paths, *a, **k):
        decoded.append([Path(p).name for p in paths])
        return real(paths, *a, **k)

    monkeypatch.setattr(extract_mod, "make_loader", spy)  # the shared extraction's image loader
    db = placerank.Database.create(tmp_path / "db", model=site["model"])
    with db:
        rep = db.add_folder(photos, progress=False)
        assert sorted(Path(p).name for p in rep.added) == ["02.jpg", "03.jpg", "DSCN0010.jpg"]
        assert decoded == [["02.jpg", "03.jpg", "DSCN0010.jpg"]]

        rep = db.add_folder(photos, progress=False)  # nothing new
        assert (rep.unchanged, rep.extracted, len(decoded)) == (3, 0, 1)

        st = (photos / "03.jpg").stat()
        os.utime(photos / "03.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        shutil.copy2(photos / "02.jpg", photos / "copy_of_02.jpg")
        rep = db.add_folder(photos, progress=False)  # touched + duplicate content
        assert [Path(p).name for p in rep.touched] == ["03.jpg"]
        assert (rep.reused, rep.extracted, len(decoded)) == (1, 0, 1)

        shutil.copy2(site["held"] / "01.jpg", photos / "01.jpg")  # one new photo
        shutil.copy2(src / "exif_samples_arezzo/DSCN0012.jpg", photos / "DSCN0010.jpg")  # content changed
        rep = db.add_folder(photos, progress=False)
        assert decoded[-1] == ["01.jpg", "DSCN0010.jpg"] and rep.extracted == 2
        assert [Path(p).name for p in rep.added] == ["01.jpg"] and [Path(p).name for p in rep.updated] == [
            "DSCN0010.jpg"
        ]
        row = db.store.images.conn.execute(
            "SELECT lat FROM images WHERE path=?", (str((photos / "DSCN0010.jpg").resolve()),)
        ).fetchone()
        assert row[0] == pytest.approx(43.4671567, abs=1e-6)  # DSCN0012's EXIF now
        assert len(db) == 5 and len(db.store.index()) == 5

        rep = db.remove([photos / "copy_of_02.jpg", photos / "nothing.jpg"])
        assert [Path(p).name for p in rep.removed] == ["copy_of_02.jpg"] and rep.not_found == [
            str(photos / "nothing.jpg")
        ]
        (photos / "01.jpg").unlink()
        rep = db.add_folder(photos, prune=True, progress=False)  # copy_of_02.jpg is still in the folder
        assert [Path(p).name for p in rep.removed] == ["01.jpg"] and len(db) == 4
        assert [Path(p).name for p in rep.added] == ["copy_of_02.jpg"] and (rep.reused, rep.extracted) == (1, 0)

        (photos / "no_gps.jpg").write_bytes((site["bad"] / "no_gps.jpg").read_bytes())
        rep = db.add_folder(photos, allow_no_gps=True, progress=False)
        assert [Path(p).name for p in rep.added] == ["no_gps.jpg"] and len(db) == 5
        res = db.localize(site["held"] / "01.jpg", top_k=5)
        assert res.found and all(m.lat is None for m in res.matches if m.path.endswith("no_gps.jpg"))
        # An indexed photo overwritten by one without GPS: reported, and its stale entry dropped.
        shutil.copy(site["bad"] / "no_gps.jpg", photos / "03.jpg")
        rep = db.add_folder(photos, progress=False)
        assert [Path(p).name for p, _ in rep.no_position] == ["03.jpg"] and [Path(p).name for p in rep.removed] == [
            "03.jpg"
        ]
        assert len(db) == 4
        ids = np.sort(np.array([r[0] for r in db.store.images.conn.execute("SELECT id FROM images")]))
        assert np.array_equal(db.store.index().ids(), ids)
        # Positions in a local metric frame cannot join a GPS database.
        (tmp_path / "local.csv").write_text(f"path,easting,northing\n{photos / '02.jpg'},1.0,2.0\n")
        with pytest.raises(DataError) as e:
            db.add_folder(positions=tmp_path / "local.csv", progress=False)
        assert str(e.value) == (
            f"{db.folder}: the database holds positions in GPS (lat/lon, UTM), but "
            f"{(photos / '02.jpg').resolve()} has a position in a local metric frame "
            f"(easting/northing without a UTM zone); use a separate --db"
        )


def test_users_photos_were_only_read(site, tmp_path):
    """Self-contained (any order, alone): index with local features, localize with pictures and
    re-ranking, re-index, remove and prune a folder of photos; every photo is byte- and
    mtime-identical afterwards, and its folder holds exactly the files it held before."""
    photos = tmp_path / "photos"
    shutil.copytree(site["photos"], photos, copy_function=shutil.copy2)
    shutil.copy2(site["held"] / "01.jpg", tmp_path / "query.jpg")
    before = _snapshot(tmp_path)
    assert len(before) == 11  # 10 database photos + the query
    db = tmp_path / "db"
    rc, _, err = _run_cli(["index", str(photos), "--db", str(db), "--rerank", "ransac-xfeat", "--quiet"])
    assert rc == 0, err
    out = tmp_path / "out"
    rc, _, err = _run_cli(["localize", str(tmp_path / "query.jpg"), "--db", str(db), "--out", str(out)])
    assert rc == 0, err
    rc, _, err = _run_cli(
        ["localize", str(tmp_path / "query.jpg"), "--db", str(db), "--out", str(out), "--rerank", "ransac-xfeat"]
    )
    assert rc == 0, err
    assert (out / "query_inliers.png").exists()  # the re-ranker read the photos too
    rc, _, err = _run_cli(["index", str(photos), "--db", str(db), "--prune", "--quiet"])
    assert rc == 0, err
    rc, _, err = _run_cli(["index", "--db", str(db), "--remove", str(photos / "opensfm_berlin" / "02.jpg")])
    assert rc == 0, err
    after = {p: v for p, v in _snapshot(tmp_path).items() if not p.startswith((str(db), str(out)))}
    assert after == before
