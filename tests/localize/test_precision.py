"""A localize database holds descriptors of one precision: built with ``--precision bf16`` it
records bf16, every query is described in bf16, another explicit precision is refused with one
line, and a database made before the precision was recorded reads as fp32.

Small and fast: 8 TUM fr1_desk database frames at 96x128, one query."""

from __future__ import annotations

import contextlib
import csv
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import placerank
from placerank.cli import main
from placerank.descriptors.extract import extract_features
from placerank.descriptors.fast import COLD_MIN_IMAGES, compile_mode, prepare_inference
from placerank.localize import query as query_module
from placerank.localize.features import compile_as, compile_for

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = ("96", "128")
CPU = torch.device("cpu")


def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    """The CLI in this process: (exit status, stdout, stderr lines other than progress/warnings)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln and "warning:" not in ln]
    return code, out, lines


@pytest.fixture(scope="module")
def site(tum, tum_positions, shared_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    positions = tum_positions("precision_db.csv", start=0, stop=40, step=5)  # 8 frames
    query = next(
        tum / r["query_file"] for r in csv.DictReader(open(tum / "ground_truth.csv")) if r["has_positive"] == "1"
    )
    return {"root": root, "positions": positions, "query": query}


@pytest.fixture(scope="module")
def bf16_db(site, shared_weights):
    """A database built by the CLI with --precision bf16 (and the header it printed)."""
    db = site["root"] / "bf16.db"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        with contextlib.redirect_stdout(out):
            code = main(
                ["index", "--positions", str(site["positions"]), "--db", str(db), "--precision", "bf16"]
                + ["--image-size", *SIZE, "--quiet", "--workers", "0", "--no-compile"]
            )
    assert code == 0
    return {"db": db, "stdout": out.getvalue()}


@pytest.fixture
def weights_env(shared_weights, monkeypatch):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(shared_weights))


def _stored(db_path) -> tuple[dict[str, str], list[str], np.ndarray]:
    con = sqlite3.connect(db_path / "placerank.sqlite")
    try:
        meta = dict(con.execute("SELECT key, value FROM meta"))
        rows = con.execute("SELECT path, descriptor FROM images ORDER BY id").fetchall()
    finally:
        con.close()
    return meta, [r[0] for r in rows], np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])


def _spy_query_precision(monkeypatch) -> list[str]:
    """The precision every query extraction of :mod:`placerank.localize.query` runs in."""
    seen: list[str] = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision", "fp32"))
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(query_module, "extract_features", spy)
    return seen


def test_bf16_database_records_and_stores_bf16(bf16_db, weights_env):
    meta, paths, stored = _stored(bf16_db["db"])
    assert meta["precision"] == "bf16" and len(paths) == 8
    assert "precision: bf16" in bf16_db["stdout"].splitlines()[0]
    with placerank.Database.open(bf16_db["db"]) as db:
        assert db.precision == "bf16" and db.info()["precision"] == "bf16"
        model = db.model  # prepared for inference (channels_last) as the index run's was
        bf16 = extract_features(model, paths, CPU, 16, 0, use_cache=False, progress=False, precision="bf16")[0]
        fp32 = extract_features(model, paths, CPU, 16, 0, use_cache=False, progress=False, precision="fp32")[0]
    # The stored descriptors are the bf16 extraction, not the fp32 one (bf16 moves them ~1e-3).
    assert np.abs(stored - bf16).max() < 1e-6
    assert np.abs(stored - fp32).max() > 1e-4


def test_query_is_described_in_the_database_precision(bf16_db, site, weights_env, monkeypatch):
    seen = _spy_query_precision(monkeypatch)
    _, paths, stored = _stored(bf16_db["db"])
    with placerank.Database.open(bf16_db["db"]) as db:
        result = db.localize(site["query"], top_k=8)
        model = db.model
        q16 = extract_features(model, [site["query"]], CPU, 1, 0, use_cache=False, progress=False, precision="bf16")
        q32 = extract_features(model, [site["query"]], CPU, 1, 0, use_cache=False, progress=False, precision="fp32")
    assert seen == ["bf16"] and result.precision == "bf16" and result.to_json()["precision"] == "bf16"
    row = {p: k for k, p in enumerate(paths)}
    sims = np.array([m.similarity for m in result.matches])
    by16 = np.array([float(q16[0][0] @ stored[row[m.path]]) for m in result.matches])
    by32 = np.array([float(q32[0][0] @ stored[row[m.path]]) for m in result.matches])
    assert np.abs(sims - by16).max() < 2e-6  # the reported similarities are the bf16 query's (rounded to 1e-6)
    assert np.abs(sims - by32).max() > 1e-4  # not the fp32 query's
    assert list(np.argsort(-by16)) == list(range(len(sims)))  # ranked by them


def test_localize_cli_uses_the_database_precision(bf16_db, site, weights_env, capsys, monkeypatch):
    seen = _spy_query_precision(monkeypatch)
    out = site["root"] / "out_auto"
    code, stdout, err = _run(capsys, "localize", site["query"], "--db", bf16_db["db"], "--out", out, "--no-pictures")
    assert (code, err, seen) == (0, [], ["bf16"])
    code, _, err = _run(
        capsys, "localize", site["query"], "--db", bf16_db["db"], "--out", site["root"] / "out_bf16",
        "--no-pictures", "--precision", "bf16", "--no-compile",
    )  # fmt: skip
    assert (code, err, seen) == (0, [], ["bf16", "bf16"])


@pytest.mark.parametrize("command", ["localize", "index", "serve"])
def test_other_explicit_precision_is_one_line(bf16_db, site, weights_env, capsys, command):
    db = bf16_db["db"].resolve()
    argv = {
        "localize": ["localize", site["query"], "--db", db, "--out", site["root"] / "never"],
        "index": ["index", "--positions", site["positions"], "--db", db],
        "serve": ["serve", "--db", db, "--port", "0"],
    }[command]
    code, _, err = _run(capsys, *argv, "--precision", "fp32")
    assert code == 2
    assert err == [
        f"placerank: error: {db}: database was built with precision bf16, not fp32; "
        "use --precision bf16 (or auto) or a new --db"
    ]
    assert _stored(db)[0]["precision"] == "bf16" and len(_stored(db)[1]) == 8  # nothing changed


@pytest.mark.parametrize("command", ["localize", "index", "serve"])
def test_fp16_on_cpu_is_one_line(site, weights_env, capsys, command, tmp_path):
    db = tmp_path / "fp16.db"
    argv = {
        "localize": ["localize", site["query"], "--db", db, "--out", tmp_path / "out"],
        "index": ["index", "--positions", site["positions"], "--db", db, "--image-size", *SIZE],
        "serve": ["serve", "--db", db],
    }[command]
    code, _, err = _run(capsys, *argv, "--precision", "fp16", "--device", "cpu")
    assert (code, err) == (
        2,
        [
            "placerank: error: --precision fp16 needs a CUDA device (the device is cpu); use --precision bf16 or fp32 on CPU"
        ],
    )
    assert not db.exists()  # refused before any database is made


def test_database_without_a_recorded_precision_is_fp32(site, make_model, capsys, weights_env, monkeypatch, tmp_path):
    """A database written before the precision was recorded (no ``precision`` meta row)."""
    model = make_model("effnet-lite0-gem", image_size=(96, 128))
    path = tmp_path / "old.db"
    with placerank.Database.create(path, model=model, radius=0.3) as db:
        db.add_folder(positions=site["positions"], progress=False, num_workers=0)
    con = sqlite3.connect(path / "placerank.sqlite")
    con.execute("DELETE FROM meta WHERE key='precision'")
    con.commit()
    con.close()
    assert "precision" not in _stored(path)[0]
    seen = _spy_query_precision(monkeypatch)
    with placerank.Database.open(path, model=model) as db:
        assert db.precision == "fp32" and db.info()["precision"] == "fp32"
        assert db.localize(site["query"]).precision == "fp32"
    assert seen == ["fp32"]
    code, _, err = _run(capsys, "localize", site["query"], "--db", path, "--out", tmp_path / "o", "--precision", "bf16")
    assert code == 2 and err == [
        f"placerank: error: {path.resolve()}: database was built with precision fp32, not bf16; "
        "use --precision fp32 (or auto) or a new --db"
    ]
    code, _, err = _run(capsys, "localize", site["query"], "--db", path, "--out", tmp_path / "o2", "--no-pictures")
    assert (code, err) == (0, [])
    # The same database as if built in fp16 on a GPU, opened on this CPU: refused when the model loads.
    con = sqlite3.connect(path / "placerank.sqlite")
    con.execute("INSERT INTO meta VALUES ('precision', 'fp16')")
    con.commit()
    con.close()
    code, _, err = _run(capsys, "localize", site["query"], "--db", path, "--out", tmp_path / "o3", "--device", "cpu")
    assert (code, err) == (
        2,
        [
            f"placerank: error: {path.resolve()}: database was built with precision fp16, which needs a CUDA device"
            " (the device is cpu)"
        ],
    )


def test_compile_auto_is_decided_once_per_run(make_model):
    """``--compile auto``: a run of a few photos stays eager, one of COLD_MIN_IMAGES compiles;
    ``on`` / ``off`` are kept; the mode is ``auto`` again afterwards."""
    model = prepare_inference(make_model("effnet-lite0-gem", image_size=(96, 128)), CPU, "auto")
    with compile_for(model, 8, 16, "fp32", CPU):
        assert compile_mode(model) == "off"
    with compile_for(model, COLD_MIN_IMAGES, 16, "fp32", CPU):
        assert compile_mode(model) == "on"
        with compile_as(model, CPU, "off"):  # a photo retried alone after a failed chunk: eager
            assert compile_mode(model) == "off"
        assert compile_mode(model) == "on"
    assert compile_mode(model) == "auto"
    prepare_inference(model, CPU, "on")
    with compile_for(model, 1, 1, "fp32", CPU):
        assert compile_mode(model) == "on"
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # prepared: channels_last weights


def test_own_head_local_features_follow_the_database_precision(tum, tum_positions, make_model, tmp_path, monkeypatch):
    """FoL's ``fol-region`` scores the model's own local head: in a bf16 database its features come
    from the bf16 pass, in a store folder named with the precision, and photos without stored
    features are described in bf16 too (not by the fp32 local-only path)."""
    from placerank.descriptors.cache import namespace
    from placerank.localize import features as features_module
    from placerank.localize.features import MemoryStore

    positions = tum_positions("precision_fol.csv", 0, 48, 12)  # 4 frames
    paths = [r.split(",")[0] for r in positions.read_text().splitlines()[1:]]
    model = make_model("fol-effnet-lite0", image_size=(128, 224))  # ImageNet backbone, seeded random heads
    with placerank.Database.create(tmp_path / "db", model=model, radius=0.3, precision="bf16") as db:
        db.add_folder(positions=positions, rerank="fol-region", progress=False, num_workers=0)
        reranker = db.features.reranker("fol-region", None)
        local = tmp_path / "db" / "local"
        assert [p.name for p in local.iterdir()] == [namespace("fol-region", reranker.signature(), "precision=bf16")]
        store = db.features.store(reranker, create=False)
        assert store is not None
        shas = {str(Path(r.path).resolve()): r.sha256 for r in db.store.images.files().values()}
        got = [store.get(shas[str(Path(p).resolve())]) for p in paths]  # the database keeps resolved paths
        store.close()
        want = {}
        for precision in ("bf16", "fp32"):
            mem = MemoryStore()
            keys = extract_features(
                model, paths, CPU, 16, 0, use_cache=False, reranker=reranker, store=mem, progress=False,
                precision=precision,
            )[1]  # fmt: skip
            want[precision] = [mem[k] for k in keys]
        for g, w16, w32 in zip(got, want["bf16"], want["fp32"]):  # the store keeps float16 descriptors
            assert np.array_equal(g.keypoints, w16.keypoints)
            assert np.array_equal(g.descriptors, w16.descriptors.astype(g.descriptors.dtype))
            assert not np.array_equal(g.descriptors, w32.descriptors.astype(g.descriptors.dtype))

        seen: list[str] = []
        real = features_module.extract_features
        monkeypatch.setattr(
            features_module, "extract_features", lambda *a, **k: seen.append(k["precision"]) or real(*a, **k)
        )
        db.features.extract_now(reranker, [Path(paths[0])])  # as for a candidate without stored features
        assert seen == ["bf16"]
