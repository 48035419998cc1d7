"""Bad input files: duplicate CSV rows, NaN / inf / out-of-range coordinates, images above the
pixel limit, a bad positions CSV for ``index``, a training run that cannot start. One line each,
exit 2, nothing created, inputs unchanged."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from .conftest import FAST, write_csv


def _eval(inputs: Path, db_csv: Path, out: Path) -> list:
    return ["eval", "--database", db_csv, "--queries", inputs / "q.csv", *FAST, "--out", out]


CSV_CASES = [
    # (header, rows, the message after "placerank: error: CSV: ")
    (["path", "easting", "northing"], [["db/Image000.jpg", 0, 0], ["db/Image000.jpg", 0, 0]],
     "row 3 lists Image000.jpg again (first at row 2); remove the duplicate row"),
    (["path", "easting", "northing"], [["db/Image000.jpg", 0, 0], ["db/Image001.jpg", "nan", 0]],
     "row 3 has a easting,northing value that is not a finite number (nan, 0)"),
    (["path", "easting", "northing"], [["db/Image000.jpg", "inf", 0]],
     "row 2 has a easting,northing value that is not a finite number (inf, 0)"),
    (["path", "lat", "lon"], [["db/Image000.jpg", 48.1, 11.5], ["db/Image001.jpg", 48.1, "NaN"]],
     "row 3 has a lat,lon value that is not a finite number (48.1, nan)"),
    (["path", "lat", "lon"], [["db/Image000.jpg", 91, 11.5]],
     "row 2 has lat/lon out of range (91, 11.5); latitude must be within +-90 and longitude within +-180"),
]  # fmt: skip


@pytest.mark.parametrize("header, rows, message", CSV_CASES, ids=["duplicate", "nan", "inf", "latnan", "range"])
def test_bad_csv_rows_are_one_line_naming_the_row(inputs, cli, tmp_path, header, rows, message):
    bad = write_csv(inputs / f"bad_{tmp_path.name}.csv", header, rows)  # beside db/ (removed below)
    try:
        out = tmp_path / "out"
        assert cli(*_eval(inputs, bad, out)) == (2, [f"placerank: error: {bad}: {message}"])
        assert not out.exists()
    finally:
        bad.unlink()


def test_bad_positions_csv_creates_no_database(inputs, cli, tmp_path):
    bad = write_csv(tmp_path / "pos.csv", ["path", "lat", "lon"], [[inputs / "db/Image000.jpg", "nan", 1]])
    db = tmp_path / "db"
    assert cli("index", inputs / "db", "--db", db, "--positions", bad, *FAST[:3]) == (
        2,
        [f"placerank: error: {bad}:2: a value in lat,lon is not a number (not finite: nan, 1.0)"],
    )
    assert not db.exists()
    dup = write_csv(tmp_path / "dup.csv", ["path", "lat", "lon"], [[inputs / "db/Image000.jpg", 1, 1]] * 2)
    assert cli("index", inputs / "db", "--db", db, "--positions", dup, *FAST[:3]) == (
        2,
        [f"placerank: error: {dup}:3: Image000.jpg is listed again (first at row 2); remove the duplicate row"],
    )
    assert not db.exists()


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming ``width x height`` (a few bytes: the pixel check
    must refuse it from the header, before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [12000, 25000])  # above our limit; above PIL's own guard
def test_image_above_the_pixel_limit_is_one_line(tmp_path, side):
    from placerank.data.images import Preprocess, load_tensor
    from placerank.errors import DataError

    big = _png_header_only(tmp_path / "big.png", side, side)
    with pytest.raises(DataError) as e:
        load_tensor(big, Preprocess((64, 96)))
    mp = f"{side * side / 1e6:.0f}"
    size = f"{side}x{side} px = " if side == 12000 else ""
    assert str(e.value) == f"{big}: image is too large ({size}{mp} MP; the limit is 100 MP); downscale it first"


def test_huge_image_in_a_query_set_is_one_line(inputs, cli, tmp_path):
    big = _png_header_only(tmp_path / "big.png", 20000, 20000)
    q = write_csv(tmp_path / "q.csv", ["path", "easting", "northing"], [[big, 0, 0]])
    out = tmp_path / "out"
    args = ["eval", "--database", inputs / "db.csv", "--queries", q, *FAST, "--no-cache", "--out", out]
    assert cli(*args) == (
        2,
        [f"placerank: error: {big}: image is too large (400 MP; the limit is 100 MP); downscale it first"],
    )
    assert not out.exists()


def test_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    from PIL import Image

    from placerank.data.images import open_image

    path = tmp_path / "large.jpg"
    Image.new("RGB", (4000, 2500), (90, 120, 150)).save(path, quality=80)  # 10 MP
    info: dict = {}
    im = open_image(path, target=(64, 96), info=info)
    assert info["size"] == (2500, 4000)  # the full size, for keypoints in original pixels
    assert im.size == (500, 313)  # 1/8 scale: no smaller than twice the network input
    assert open_image(path).size == (4000, 2500)  # no target: full decode


def test_train_that_cannot_start_leaves_nothing(inputs, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--method", "fol", "--train", tmp_path / "missing.csv", "--out", run) == (
        2,
        [f"placerank: error: --train {tmp_path / 'missing.csv'}: no such file or folder"],
    )
    assert cli("train", "--method", "nope", "--train", inputs / "db.csv", "--out", run)[0] == 2
    f = tmp_path / "file"
    f.write_text("x")
    assert cli("train", "--method", "fol", "--train", inputs / "db.csv", "--out", f) == (
        2,
        [f"placerank: error: --out {f} is an existing file; give a run folder"],
    )
    # the trainer fails at start (db.csv has positions in metres, no place labels): no run folder left
    code, lines = cli(
        "train", "--method", "fol", "--train", inputs / "db.csv", "--out", run, *FAST[:3], "--workers", "0"
    )
    assert code == 2 and len(lines) == 1 and lines[0].startswith("placerank: error: "), lines
    assert not run.exists()
