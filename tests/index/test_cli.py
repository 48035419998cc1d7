"""``--index SPEC`` / ``--index-option KEY=VALUE`` on eval, search and index: the index block of
results.json and candidates.json, and one-line errors (exit 2, before any output) for a bad spec,
a bad option and too few images to train. Tiny input: 4 database + 3 query GardensPoint frames."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from placerank.cli import main

FAST = ["--image-size", "64", "96", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def inputs(gardens, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index_cli")
    for side, src, frames in (("db", "day_right", (0, 1, 2, 3)), ("q", "night_right", (0, 2, 3))):
        (root / side).mkdir()
        with open(root / f"{side}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "easting", "northing"])
            for k in frames:
                shutil.copy(gardens / src / f"Image{k:03d}.jpg", root / side / f"Image{k:03d}.jpg")
                w.writerow([f"{side}/Image{k:03d}.jpg", 10.0 * k, 0.0])
    return root


@pytest.fixture
def cli(capsys):
    def run(*argv) -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        run.out = captured.out  # type: ignore[attr-defined]
        err = captured.err.replace("\r", "\n").splitlines()
        return code, [ln for ln in err if ln.strip() and "%|" not in ln and not ln.startswith("placerank: warning")]

    return run


def _eval(inputs, out, *extra):
    return ["eval", "--database", inputs / "db.csv", "--queries", inputs / "q.csv", "--radius", "15", "--out", out]


def test_eval_with_an_ivf_index_writes_the_index_block(inputs, cli, tmp_path):
    out = tmp_path / "ivf"
    code, err = cli(*_eval(inputs, out), *FAST, "--index", "IVF2,Flat", "--index-option", "nprobe=2")
    assert (code, err) == (0, [])
    block = json.loads((out / "results.json").read_text())["index"]
    assert set(block) == {
        "spec",
        "options",
        "train_size",
        "bytes",
        "bytes_per_image",
        "build_s",
        "on_disk",
        "search_ms_per_query",
    }
    assert block["spec"] == "IVF2,Flat" and block["options"] == {"nprobe": "2"} and block["train_size"] == 4
    flat = tmp_path / "flat"
    assert cli(*_eval(inputs, flat), *FAST)[0] == 0
    a, b = (json.loads((o / "results.json").read_text()) for o in (out, flat))
    assert b["index"]["spec"] == "flat" and b["index"]["options"] == {}
    assert a["recall"] == b["recall"]  # every list probed: the same ranking as flat
    from placerank.eval.results import EvalResult

    del b["index"]  # a results.json from before index kinds still loads
    (flat / "results.json").write_text(json.dumps(b))
    assert EvalResult.load(flat / "results.json").index is None


BAD = [
    (
        ["--index", "IVFfoo"],
        "index spec 'IVFfoo' is not valid: FAISS says 'could not parse index string IVFfoo' (use flat, flat-fp16 "
        "or a FAISS index-factory string such as IVF1024,Flat or IVF4096,PQ64)",
    ),
    (
        ["--index", "HNSW8", "--index-option", "nprobe=4"],
        "index 'HNSW8' has no option 'nprobe': its options are efSearch",
    ),
    (["--index-option", "nprobe"], "--index-option expects KEY=VALUE, got 'nprobe'"),
    (
        ["--index", "IVF16,Flat"],
        "index 'IVF16,Flat' needs at least 16 descriptors to train (its k-means has 16 centroids), got 4 database "
        "descriptors: index more images, use fewer lists (e.g. IVF16,Flat) or --index flat",
    ),
]


@pytest.mark.parametrize("flags,line", BAD)
def test_bad_index_requests_are_one_line_before_any_output(flags, line, inputs, cli, tmp_path):
    out = tmp_path / "o"
    assert cli(*_eval(inputs, out), *FAST, *flags) == (2, [f"placerank: error: {line}"])
    assert not out.exists()


def test_search_records_the_index_and_redoes_on_a_new_spec(inputs, cli, tmp_path):
    for side in ("db", "q"):
        assert cli("extract", "--images", inputs / f"{side}.csv", "--out", tmp_path / side, *FAST)[0] == 0
    args = ["search", "--database", tmp_path / "db", "--queries", tmp_path / "q", "--top-k", "3"]
    assert cli(*args, "--out", tmp_path / "c", "--index", "flat-fp16")[0] == 0
    meta = json.loads((tmp_path / "c" / "candidates.json").read_text())
    assert meta["index"]["spec"] == "flat-fp16" and meta["index"]["bytes_per_image"] > 0
    cli(*args, "--out", tmp_path / "c", "--index", "flat-fp16")
    assert "up to date" in cli.out
    cli(*args, "--out", tmp_path / "c", "--index", "flat")
    assert json.loads((tmp_path / "c" / "candidates.json").read_text())["index"]["spec"] == "flat"


def test_index_command_takes_the_index_kind(inputs, cli, tmp_path):
    db = tmp_path / "db"
    base = ["index", "--positions", inputs / "db.csv", "--db", db, "--image-size", "64", "96", "--quiet"]
    assert cli(*base, "--index", "HNSW8", "--index-option", "efSearch=32") == (0, [])
    assert "index: HNSW8 efSearch=32" in cli.out
    assert json.loads((db / "index.json").read_text())["spec"] == "HNSW8"
    # HNSW cannot remove rows: the index is rebuilt from the stored descriptors instead
    assert cli("index", "--db", db, "--remove", inputs / "db" / "Image000.jpg")[0] == 0
    saved = json.loads((db / "index.json").read_text())
    assert (saved["spec"], saved["count"], saved["options"]) == ("HNSW8", 3, {"efSearch": "32"})
    assert cli("index", "--db", db, "--index", "flat-fp16")[0] == 0
    assert json.loads((db / "index.json").read_text())["spec"] == "flat-fp16"
    assert cli("index", "--db", db, "--index", "PQ7")[0] == 2  # 1280-d descriptors: 7 does not divide it


def test_a_database_too_small_to_train_its_kind_is_flat_until_it_has_enough(inputs, gardens, cli, tmp_path):
    db = tmp_path / "db"
    base = ["--db", db, "--image-size", "64", "96", "--quiet"]
    assert cli("index", "--positions", inputs / "db.csv", *base, "--index", "IVF8,Flat") == (0, [])
    assert "index: IVF8,Flat" in cli.out  # asked for ...
    assert json.loads((db / "index.json").read_text())["spec"] == "flat"  # ... but 4 photos cannot train 8 lists
    more = tmp_path / "more"
    more.mkdir()
    with open(tmp_path / "more.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "easting", "northing"])
        for k in range(4, 12):
            shutil.copy(gardens / "day_right" / f"Image{k:03d}.jpg", more / f"Image{k:03d}.jpg")
            w.writerow([f"more/Image{k:03d}.jpg", 10.0 * k, 0.0])
    assert cli("index", "--positions", tmp_path / "more.csv", *base)[0] == 0
    saved = json.loads((db / "index.json").read_text())
    assert (saved["spec"], saved["count"], saved["options"]) == ("IVF8,Flat", 12, {"nprobe": "8"})
    code, err = cli("localize", inputs / "q" / "Image002.jpg", "--db", db, "--out", tmp_path / "loc")
    assert (code, err) == (0, [])


def test_rescore_on_search_and_refused_by_the_localize_database(inputs, cli, tmp_path):
    for side in ("db", "q"):
        assert cli("extract", "--images", inputs / f"{side}.csv", "--out", tmp_path / side, *FAST)[0] == 0
    args = ["search", "--database", tmp_path / "db", "--queries", tmp_path / "q", "--top-k", "3"]
    assert cli(*args, "--out", tmp_path / "f")[0] == 0
    assert cli(*args, "--out", tmp_path / "r", "--index", "HNSW8", "--index-option", "rescore=4")[0] == 0
    flat, res = (json.loads((tmp_path / c / "candidates.json").read_text()) for c in ("f", "r"))
    assert res["index"]["options"]["rescore"] == "4"
    from placerank.index.candidates import load_candidates

    a, b = load_candidates(tmp_path / "f"), load_candidates(tmp_path / "r")
    assert (a.ids == b.ids).all()  # all 4 rows re-scored exactly: the flat ranking
    code, err = cli("index", "--positions", inputs / "db.csv", "--db", tmp_path / "ldb", "--image-size", "64", "96",
                    "--quiet", "--index", "HNSW8", "--index-option", "rescore=4")  # fmt: skip
    assert code == 2 and len(err) == 1 and "rescore is only supported by eval and search" in err[0], err
