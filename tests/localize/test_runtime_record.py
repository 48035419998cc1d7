"""A bf16 localize database keeps to the runtime that made its descriptors (``runtime`` meta
row): ``auto`` takes it, another explicit runtime is one line, and a model that falls back from
it is refused before anything is stored or searched; an fp32 database takes any runtime (their
fp32 descriptors agree to 1e-5). OpenVINO itself is never loaded here (a refusing encoder stands
in for a model it cannot take)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

import placerank
from placerank.cli import main
from placerank.errors import IndexMismatchError

pytestmark = pytest.mark.usefixtures("single_thread")


def _index(db: Path, positions: Path, precision: str) -> None:
    argv = ["index", "--positions", str(positions), "--db", str(db), "--precision", precision]
    argv += ["--image-size", "96", "128", "--quiet", "--workers", "0", "--no-compile", "--runtime", "torch"]
    assert main(argv) == 0


def _set_meta(db: Path, key: str, value: str) -> None:
    con = sqlite3.connect(db / "placerank.sqlite")
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    con.close()


@pytest.fixture(scope="module")
def dbs(tum_positions, shared_weights, tmp_path_factory):
    """bf16 and fp32 databases of 4 TUM frames built on PyTorch, and a copy of the bf16 one whose
    meta row says OpenVINO made its descriptors."""
    root = tmp_path_factory.mktemp("runtime_record")
    positions = tum_positions("runtime_db.csv", start=0, stop=20, step=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLACERANK_WEIGHTS", str(shared_weights))
        _index(root / "bf16", positions, "bf16")
        _index(root / "fp32", positions, "fp32")
    shutil.copytree(root / "bf16", root / "bf16-openvino")
    _set_meta(root / "bf16-openvino", "runtime", "openvino")
    return root


@pytest.fixture
def weights_env(shared_weights, monkeypatch):
    monkeypatch.setenv("PLACERANK_WEIGHTS", str(shared_weights))


def test_the_runtime_is_recorded_and_a_bf16_database_refuses_another(dbs, weights_env):
    with placerank.Database.open(dbs / "bf16", runtime="auto") as db:
        assert db.info()["runtime"] == "torch" and db.runtime == "torch"  # auto -> the stored one
    with pytest.raises(IndexMismatchError) as e:
        placerank.Database.open(dbs / "bf16", runtime="openvino")
    assert str(e.value) == (
        f"{dbs / 'bf16'}: database was built at precision bf16 with --runtime torch, not openvino;"
        " use --runtime torch (or auto) or a new --db"
    )
    with placerank.Database.open(dbs / "bf16-openvino", runtime="auto") as db:
        assert db.runtime == "openvino"
    with pytest.raises(IndexMismatchError, match="with --runtime openvino, not torch; use --runtime openvino"):
        placerank.Database.open(dbs / "bf16-openvino", runtime="torch")


def test_an_fp32_database_takes_any_runtime(dbs, weights_env):
    for runtime in ("torch", "openvino", "auto"):
        with placerank.Database.open(dbs / "fp32", runtime=runtime) as db:
            assert db.runtime == runtime and db.info()["runtime"] == "torch"


def test_the_cli_refusal_is_one_line(dbs, weights_env, tum, tmp_path, capsys):
    query = sorted((tum / "queries").glob("*.jpg"))[0]
    capsys.readouterr()
    code = main(
        ["localize", str(query), "--db", str(dbs / "bf16"), "--runtime", "openvino", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"placerank: error: {dbs / 'bf16'}: database was built at precision bf16 with --runtime torch, not"
        " openvino; use --runtime torch (or auto) or a new --db"
    )
    assert not (tmp_path / "o").exists()


def test_a_model_that_falls_back_from_the_databases_runtime_is_refused(
    dbs, weights_env, tum, tum_positions, monkeypatch
):
    from placerank.descriptors import runtime

    def refuse(*args, **kwargs):
        raise RuntimeError("an op the exporter refuses")

    monkeypatch.setattr(runtime, "ExportedEncoder", refuse)
    query = sorted((tum / "queries").glob("*.jpg"))[0]
    more = tum_positions("runtime_more.csv", start=20, stop=30, step=5)
    before = sqlite3.connect(dbs / "bf16-openvino" / "placerank.sqlite").execute("SELECT COUNT(*) FROM images")
    count = before.fetchone()[0]
    with placerank.Database.open(dbs / "bf16-openvino", runtime="auto") as db:
        with pytest.raises(IndexMismatchError) as e:
            db.localize(query, top_k=2)
        with pytest.raises(IndexMismatchError, match="not mixing them"):
            db.add_folder(positions=more, progress=False)
    assert str(e.value) == (
        f"{dbs / 'bf16-openvino'}: database descriptors are bf16 from --runtime openvino, but the model now runs"
        " on torch (it could not run on openvino); not mixing them"
    )
    after = sqlite3.connect(dbs / "bf16-openvino" / "placerank.sqlite").execute("SELECT COUNT(*) FROM images")
    assert after.fetchone()[0] == count
