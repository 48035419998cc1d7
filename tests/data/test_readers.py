"""Dataset readers and ground truth on the real shared data."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from placerank.data.dataset import ImageSet, PositiveRule
from placerank.data.geo import latlon_to_utm, utm_to_latlon
from placerank.data.positives import compute_positives
from placerank.data.readers import load_dataset, read_csv_manifest, read_image_set
from placerank.errors import DataError


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_traversal_folder_frames_follow_file_names(gardens):
    s = read_image_set(gardens / "day_right", "frames")
    assert s.kind == "frame" and len(s) == 140
    assert [p.name for p in s.paths[:3]] == ["Image000.jpg", "Image001.jpg", "Image002.jpg"]
    assert s.positions.tolist() == list(range(140))


def test_frame_positives_match_shipped_ground_truth(gardens):
    ds = load_dataset(gardens / "day_right", gardens / "night_right", frame_tolerance=2)
    gt = np.load(gardens / "gt_matrix_tol2.npy")
    for q, pos in enumerate(ds.positives):
        assert pos.tolist() == np.flatnonzero(gt[q]).tolist()


def test_latlon_manifest_converts_to_the_shipped_utm(shared_data):
    folder = shared_data / "geotagged_photos"
    rows = list(csv.DictReader(open(folder / "positions.csv")))
    latlon = np.array([[float(r["lat"]), float(r["lon"])] for r in rows])
    en, zones = latlon_to_utm(latlon)
    shipped = np.array([[float(r["utm_east"]), float(r["utm_north"])] for r in rows])
    np.testing.assert_allclose(en, shipped, atol=0.05)
    assert set(zones.tolist()) == {32632, 32633}
    np.testing.assert_allclose(utm_to_latlon(en, zones), latlon, atol=1e-7)


def test_radius_positives_match_brute_force_and_shipped_list(shared_data, tmp_path):
    folder = shared_data / "geotagged_photos"
    rows = list(csv.DictReader(open(folder / "positions.csv")))
    manifest = _write_csv(
        tmp_path / "geo.csv", ["path", "lat", "lon"], [[str(folder / r["file"]), r["lat"], r["lon"]] for r in rows]
    )
    s = read_csv_manifest(manifest)
    pos = compute_positives(s, s, PositiveRule("utm", radius=25.0))
    d = np.linalg.norm(s.positions[:, None] - s.positions[None], axis=2)
    same_zone = s.utm_zone[:, None] == s.utm_zone[None]
    brute = [np.flatnonzero((d[i] <= 25.0) & same_zone[i]).tolist() for i in range(len(s))]
    assert [p.tolist() for p in pos] == brute
    shipped = {
        r["file"]: (r["positives_within_25m"] or "").split() for r in csv.DictReader(open(folder / "positives_25m.csv"))
    }
    for i, r in enumerate(rows):
        mine = sorted(rows[j]["file"] for j in pos[i] if j != i)
        assert mine == sorted(shipped[r["file"]])


def test_radius_positives_large_random_match_brute_force():
    rng = np.random.default_rng(0)
    db = ImageSet([Path(f"d{i}") for i in range(3000)], "utm", rng.uniform(0, 2000, (3000, 2)) + [500000, 5.3e6])
    q = ImageSet([Path(f"q{i}") for i in range(700)], "utm", rng.uniform(0, 2000, (700, 2)) + [500000, 5.3e6])
    pos = compute_positives(db, q, PositiveRule("utm", radius=40.0), chunk=128)
    for i in range(0, 700, 37):
        brute = np.flatnonzero(np.linalg.norm(db.positions - q.positions[i], axis=1) <= 40.0)
        assert pos[i].tolist() == brute.tolist()


def test_manifest_and_utm_folder_give_identical_datasets(gardens, tmp_path):
    """The same 30 images as an @UTM@ folder and as a CSV manifest: same positives."""
    utm = tmp_path / "utm"
    utm.mkdir()
    rows = []
    for k in range(30):
        src = gardens / "day_right" / f"Image{k:03d}.jpg"
        name = f"@500000.00@{5300000 + 2.0 * k:.2f}@day@{k:03d}@.jpg"
        os.symlink(src, utm / name)
        rows.append([str(src), 500000.0, 5300000 + 2.0 * k])
    manifest = _write_csv(tmp_path / "m.csv", ["path", "easting", "northing"], rows)
    a = load_dataset(utm, utm, radius=4.0)
    b = load_dataset(manifest, manifest, radius=4.0)
    assert a.database.kind == b.database.kind == "utm"
    np.testing.assert_allclose(a.database.positions, b.database.positions)
    assert [p.tolist() for p in a.positives] == [p.tolist() for p in b.positives]
    assert [p.tolist() for p in a.positives][5] == [3, 4, 5, 6, 7]


def test_place_id_manifest(shared_data, tmp_path):
    folder = shared_data / "gardenspoint_sfu_triplets"
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    m = _write_csv(
        tmp_path / "places.csv", ["path", "place_id"], [[str(folder / r["file"]), r["place_id"]] for r in rows]
    )
    s = read_csv_manifest(m)
    assert s.kind == "place" and len(s) == 30
    pos = compute_positives(s, s, PositiveRule("place"))
    assert all(len(p) == 3 for p in pos)


# ---- bad input: one-line errors --------------------------------------------------------------


def test_missing_folder_error(tmp_path):
    with pytest.raises(DataError, match=r"^.*/nope: folder does not exist$"):
        read_image_set(tmp_path / "nope")


def test_empty_database_error(tmp_path, gardens):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found$"):
        load_dataset(tmp_path / "empty", gardens / "night_right")


def test_csv_without_position_column(tmp_path, gardens):
    m = _write_csv(tmp_path / "bad.csv", ["path", "heading"], [[str(gardens / "day_right" / "Image000.jpg"), 3]])
    with pytest.raises(DataError) as e:
        read_csv_manifest(m)
    assert (
        str(e.value)
        == f"{m}: CSV has no known position column; add one of: easting,northing | lat,lon | frame | place_id"
    )


def test_csv_with_two_position_groups(tmp_path, gardens):
    m = _write_csv(
        tmp_path / "two.csv", ["path", "frame", "place_id"], [[str(gardens / "day_right" / "Image000.jpg"), 0, "a"]]
    )
    with pytest.raises(DataError, match="several position columns"):
        read_csv_manifest(m)


def test_csv_listing_missing_image(tmp_path):
    m = _write_csv(tmp_path / "miss.csv", ["path", "frame"], [["nothere.jpg", 0]])
    with pytest.raises(DataError, match=r"1 listed image\(s\) do not exist"):
        read_csv_manifest(m)


def test_radius_on_frame_data_is_refused(gardens):
    with pytest.raises(DataError, match="--radius needs metric positions"):
        load_dataset(gardens / "day_right", gardens / "night_right", radius=10)
