"""Descriptor cache integrity: altered bytes are re-extracted, never used; a corrupt file is moved
aside and rebuilt; a read-only cache is used read-only; caches from before checksums upgrade in
place (their rows count as missing); a full disk is one line. Each repair is one warning line."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from placerank.descriptors.cache import DescriptorCache

from .conftest import FAST


def _vec(seed: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def _warnings(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_altered_bytes_are_not_used(tmp_path, capsys):
    cache = DescriptorCache("m", 8, root=tmp_path)
    cache.put_many([("a", _vec(0)), ("b", _vec(1))])
    cache.close()
    con = sqlite3.connect(tmp_path / "m.sqlite")
    blob = bytearray(con.execute("SELECT vec FROM desc WHERE key='a'").fetchone()[0])
    blob[5] ^= 0x40  # one flipped bit, still a valid SQLite file
    with con:
        con.execute("UPDATE desc SET vec=? WHERE key='a'", (bytes(blob),))
    con.close()
    cache = DescriptorCache("m", 8, root=tmp_path)
    got = cache.get_many(["a", "b"])
    assert list(got) == ["b"] and np.array_equal(got["b"], _vec(1))
    assert _warnings(capsys) == [
        f"placerank: warning: descriptor cache {tmp_path / 'm.sqlite'}: 1 entry failed the checksum; re-extracting"
    ]
    cache.put_many([("a", _vec(0))])  # re-extracted and stored again
    assert np.array_equal(cache.get_many(["a"])["a"], _vec(0))


def test_cache_without_checksums_upgrades_in_place(tmp_path):
    con = sqlite3.connect(tmp_path / "m.sqlite")
    con.execute("CREATE TABLE desc (key TEXT PRIMARY KEY, vec BLOB)")  # format 1
    with con:
        con.execute("INSERT INTO desc VALUES ('a', ?)", (_vec(0).tobytes(),))
    con.close()
    cache = DescriptorCache("m", 8, root=tmp_path)
    assert cache.get_many(["a"]) == {}  # no checksum: re-extracted, never trusted
    cache.put_many([("a", _vec(0))])
    assert np.array_equal(cache.get_many(["a"])["a"], _vec(0))


def test_corrupt_cache_file_is_moved_aside_and_rebuilt(tmp_path, capsys):
    (tmp_path / "m.sqlite").write_bytes(b"this is not SQLite" * 100)
    cache = DescriptorCache("m", 8, root=tmp_path)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("m.sqlite.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"this is not SQLite" * 100
    assert _warnings(capsys) == [
        f"placerank: warning: descriptor cache {tmp_path / 'm.sqlite'} was corrupt (file is not a database);"
        f" moved it to {aside[0].name} and rebuilding it"
    ]
    cache.put_many([("a", _vec(0))])
    assert len(cache) == 1


def test_read_only_cache_is_used_read_only(tmp_path, capsys, monkeypatch):
    cache = DescriptorCache("m", 8, root=tmp_path)
    cache.put_many([("a", _vec(0))])
    cache.close()

    def refuse(self):  # root may write anywhere: stand in for a read-only file
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(DescriptorCache, "_open", refuse)
    cache = DescriptorCache("m", 8, root=tmp_path)
    assert not cache.writable and np.array_equal(cache.get_many(["a"])["a"], _vec(0))
    cache.put_many([("b", _vec(1))])  # skipped, no error
    assert cache.get_many(["b"]) == {}
    assert _warnings(capsys) == [
        f"placerank: warning: descriptor cache {tmp_path / 'm.sqlite'} is not writable (attempt to write a readonly"
        " database); using it read-only"
    ]
    missing = DescriptorCache("other", 8, root=tmp_path)  # cannot be created: skipped
    assert missing.get_many(["a"]) == {} and len(missing) == 0
    assert _warnings(capsys) == [
        f"placerank: warning: descriptor cache {tmp_path / 'other.sqlite'} cannot be used (attempt to write a readonly"
        " database); extracting without it (see $PLACERANK_CACHE)"
    ]


def test_eval_reextracts_altered_cached_descriptors(inputs, cli, tmp_path, capsys):
    def run(out: Path) -> dict:
        args = ["eval", "--database", inputs / "db.csv", "--queries", inputs / "q.csv", "--radius", "15", *FAST]
        assert cli(*args, "--examples", "0", "--out", out)[0] == 0
        result = json.loads((out / "results.json").read_text())
        return {k: result[k] for k in ("recall", "recall_first_stage", "num_queries", "num_database")}

    first = run(tmp_path / "a")
    (path,) = (tmp_path / "cache" / "descriptors").glob("*.sqlite")
    con = sqlite3.connect(path)
    with con:  # every cached descriptor altered: a valid SQLite file with wrong numbers
        for key, vec in con.execute("SELECT key, vec FROM desc").fetchall():
            con.execute("UPDATE desc SET vec=? WHERE key=?", (bytes(b ^ 0x55 for b in vec), key))
    con.close()
    capsys.readouterr()
    assert run(tmp_path / "b") == first
