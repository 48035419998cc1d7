"""EXIF GPS, positions CSVs and the position/confidence estimate: no model needed."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest

from placerank.data.exif import GpsReading, NoGps, read_gps
from placerank.data.positions import Position, parse_zone, read_positions_csv
from placerank.errors import DataError
from placerank.localize.estimate import EstimateConfig, estimate_position


@pytest.fixture(scope="module")
def geo(shared_data):
    return shared_data / "geotagged_photos"


def _truth(geo):
    return {r["file"]: r for r in csv.DictReader(open(geo / "positions.csv"))}


def test_exif_gps_matches_the_datasets_positions(geo):
    truth = _truth(geo)
    assert len(truth) == 12
    for name, row in truth.items():
        g = read_gps(geo / name)
        assert isinstance(g, GpsReading), name
        # positions.csv has 7 decimals (1 cm); the EXIF rationals are the source of it.
        assert g.lat == pytest.approx(float(row["lat"]), abs=1e-7)
        assert g.lon == pytest.approx(float(row["lon"]), abs=1e-7)
        pos = Position.from_latlon(g.lat, g.lon)
        assert pos.epsg == 32600 + int(row["utm_zone"])
        assert pos.easting == pytest.approx(float(row["utm_east"]), abs=0.02)
        assert pos.northing == pytest.approx(float(row["utm_north"]), abs=0.02)
    assert read_gps(geo / "opensfm_berlin/01.jpg").altitude == 27.0


def test_no_gps_and_damaged_exif_messages(geo, shared_data, tmp_path):
    tum = next((shared_data / "tum_rgbd_fr1_desk" / "database").glob("*.jpg"))
    assert read_gps(tum) == NoGps("no EXIF metadata")
    raw = (geo / "opensfm_berlin/02.jpg").read_bytes()
    tiff = raw.find(b"Exif\x00\x00") + 6
    # 1. byte-order mark destroyed: exifread silently returns nothing, we call it damaged.
    bom = bytearray(raw)
    bom[tiff : tiff + 2] = b"XX"
    (tmp_path / "bom.jpg").write_bytes(bytes(bom))
    with pytest.raises(DataError) as e:
        read_gps(tmp_path / "bom.jpg")
    assert str(e.value) == f"{tmp_path / 'bom.jpg'}: EXIF block is damaged (invalid TIFF byte-order mark)"
    # 2. garbage over IFD0: exifread (strict) finds an impossible field type.
    garb = bytearray(raw)
    garb[tiff + 8 : tiff + 194] = bytes(range(186))
    (tmp_path / "garb.jpg").write_bytes(bytes(garb))
    with pytest.raises(DataError) as e:
        read_gps(tmp_path / "garb.jpg")
    assert (
        str(e.value)
        == f"{tmp_path / 'garb.jpg'}: EXIF block is damaged (ValueError: Unknown field type 1284 in tag 0x0302)"
    )
    # 3. the GPS pointer survives but the GPS block is cut off.
    (tmp_path / "cut.jpg").write_bytes(raw[: tiff + 114])
    with pytest.raises(DataError) as e:
        read_gps(tmp_path / "cut.jpg")
    assert str(e.value) == f"{tmp_path / 'cut.jpg'}: EXIF GPS block is damaged (the GPS pointer leads to no tags)"
    with pytest.raises(DataError) as e:
        read_gps(tmp_path / "missing.jpg")
    assert str(e.value) == f"{tmp_path / 'missing.jpg'}: cannot read file (No such file or directory)"


def test_reading_exif_leaves_the_file_alone(geo, tmp_path):
    p = tmp_path / "01.jpg"
    shutil.copy2(geo / "opensfm_berlin/01.jpg", p)
    before = (p.stat().st_mtime_ns, p.read_bytes())
    read_gps(p)
    assert (p.stat().st_mtime_ns, p.read_bytes()) == before


def test_positions_csv_layouts(geo, tmp_path):
    pos = read_positions_csv(geo / "positions.csv")  # lat,lon (+ utm columns it ignores)
    berlin = pos[(geo / "opensfm_berlin/01.jpg").resolve()]
    assert berlin.frame == "wgs84" and berlin.epsg == 32633
    assert berlin.easting == pytest.approx(391457.34, abs=0.02)

    (tmp_path / "utm.csv").write_text("path,easting,northing,utm_zone\na.jpg,391457.34,5819958.73,33N\n")
    p = read_positions_csv(tmp_path / "utm.csv")[(tmp_path / "a.jpg").resolve()]
    assert (p.epsg, p.frame) == (32633, "wgs84")
    assert p.lat == pytest.approx(52.5189167, abs=1e-6) and p.lon == pytest.approx(13.4002944, abs=1e-6)

    (tmp_path / "local.csv").write_text("path,easting,northing\nsub/b.jpg,1.25,-0.5\n")
    p = read_positions_csv(tmp_path / "local.csv")[(tmp_path / "sub/b.jpg").resolve()]
    assert (p.frame, p.lat, p.easting, p.northing) == ("local", None, 1.25, -0.5)

    assert parse_zone("33", "x") == 32633 and parse_zone("33S", "x") == 32733 and parse_zone("32632", "x") == 32632
    (tmp_path / "bad.csv").write_text("path,easting,northing,utm_zone\na.jpg,1,2,99\n")
    with pytest.raises(DataError) as e:
        read_positions_csv(tmp_path / "bad.csv")
    assert str(e.value) == f"{tmp_path / 'bad.csv'}:2: '99' is not a UTM zone (use e.g. 33, 33N, 33S or EPSG 32633)"
    (tmp_path / "nopos.csv").write_text("path,x,y\na.jpg,1,2\n")
    with pytest.raises(DataError) as e:
        read_positions_csv(tmp_path / "nopos.csv")
    assert str(e.value) == f"{tmp_path / 'nopos.csv'}: positions CSV needs lat,lon or easting,northing columns"


def test_estimate_weights_share_and_margin_by_hand():
    # Ranked candidates: two at place A (0,0) and (10,0), one at place B 500 m away.
    pos = np.array([[0.0, 0.0], [10.0, 0.0], [500.0, 0.0]])
    sims = np.array([0.80, 0.78, 0.76])
    est = estimate_position(pos, sims, "similarity", EstimateConfig(radius=25.0))
    w = np.exp((sims - 0.80) / 0.02)  # 1, e^-1, e^-2
    assert est.weights == pytest.approx(w)
    assert est.agrees.tolist() == [True, True, False]
    assert est.position == pytest.approx([10 * w[1] / (w[0] + w[1]), 0.0])
    assert est.share == pytest.approx((w[0] + w[1]) / w.sum())
    assert est.margin == pytest.approx(0.04)
    assert est.margin_factor == pytest.approx(0.8)  # 0.04 / 0.05
    assert est.confidence == pytest.approx(0.8 * (1 + math.exp(-1)) / (1 + math.exp(-1) + math.exp(-2)))

    # Re-rank mode: inlier counts normalised by the best, tau 0.1; all agreeing -> margin factor 1.
    est = estimate_position(pos[:2], np.array([200.0, 100.0]), "rerank", EstimateConfig(radius=25.0))
    assert est.weights == pytest.approx([1.0, math.exp(-5)])
    assert est.margin is None and est.margin_factor == 1.0 and est.confidence == pytest.approx(1.0)

    # No position for rank 1: rank 2 defines the place; no geometric evidence at all: no estimate.
    pos_nan = np.array([[np.nan, np.nan], [3.0, 4.0]])
    est = estimate_position(pos_nan, np.array([0.9, 0.8]))
    assert est.best == 1 and est.position == pytest.approx([3.0, 4.0]) and est.weights[0] == 0.0
    assert estimate_position(pos[:2], np.array([0.0, 0.0]), "rerank").position is None
