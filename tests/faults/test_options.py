"""Numeric flags are checked when parsed: one ``placerank: error:`` line, exit 2, before any work
(no output folder, no database), for every command that takes them."""

from __future__ import annotations

import pytest

BAD = [
    # (command line, the one expected line)
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--radius", "-5"],
        "placerank: error: argument --radius: must be a number > 0, got '-5'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--radius", "nan"],
        "placerank: error: argument --radius: must be a number > 0, got 'nan'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--top-k", "-3"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got '-3'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--top-k", "0"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got '0'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--image-size", "0"],
        "placerank: error: argument --image-size: must be a whole number >= 1, got '0'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--batch-size", "0"],
        "placerank: error: argument --batch-size: must be a whole number >= 1, got '0'; see placerank eval --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--frame-tolerance", "-1"],
        "placerank: error: argument --frame-tolerance: must be a whole number >= 0, got '-1';"
        " see placerank eval --help",
    ),
    (
        ["localize", "P.jpg", "--db", "DB", "--out", "O", "--radius", "-5"],
        "placerank: error: argument --radius: must be a number > 0, got '-5'; see placerank localize --help",
    ),
    (
        ["localize", "P.jpg", "--db", "DB", "--out", "O", "--top-k", "0"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got '0'; see placerank localize --help",
    ),
    (
        ["index", "F", "--db", "DB", "--radius", "0"],
        "placerank: error: argument --radius: must be a number > 0, got '0'; see placerank index --help",
    ),
    (
        ["index", "F", "--db", "DB", "--wait", "-1"],
        "placerank: error: argument --wait: must be a number >= 0, got '-1'; see placerank index --help",
    ),
    (
        ["index", "F", "--db", "DB", "--batch-size", "0"],
        "placerank: error: argument --batch-size: must be a whole number >= 1, got '0'; see placerank index --help",
    ),
    (
        ["train", "--method", "fol", "--train", "X", "--out", "R", "--epochs", "0"],
        "placerank: error: argument --epochs: must be a whole number >= 1, got '0'; see placerank train --help",
    ),
    (
        ["train", "--method", "fol", "--train", "X", "--out", "R", "--epochs", "-3"],
        "placerank: error: argument --epochs: must be a whole number >= 1, got '-3'; see placerank train --help",
    ),
    (
        ["train", "--method", "fol", "--train", "X", "--out", "R", "--max-minutes", "0"],
        "placerank: error: argument --max-minutes: must be a number > 0, got '0'; see placerank train --help",
    ),
    (
        ["search", "--database", "D", "--queries", "Q", "--out", "O", "--top-k", "0"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got '0'; see placerank search --help",
    ),
    (
        ["rerank", "--candidates", "C", "--rerank", "ransac-xfeat", "--out", "O", "--top-k", "x"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got 'x'; see placerank rerank --help",
    ),
    (
        ["extract", "--images", "I", "--out", "O", "--batch-size", "0"],
        "placerank: error: argument --batch-size: must be a whole number >= 1, got '0'; see placerank extract --help",
    ),
    (
        ["demo", "--top-k", "0"],
        "placerank: error: argument --top-k: must be a whole number >= 1, got '0'; see placerank demo --help",
    ),
    (
        ["match", "A", "B", "--longest-side", "-1"],
        "placerank: error: argument --longest-side: must be a whole number >= 1, got '-1'; see placerank match --help",
    ),
    (
        ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--bogus"],
        "placerank: error: unrecognized arguments: --bogus; see placerank --help",
    ),
]


@pytest.mark.parametrize("argv, line", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_numbers_are_one_line_before_any_work(argv, line, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(*argv) == (2, [line])
    assert list(tmp_path.iterdir()) == []  # nothing created: no output folder, no database


def test_missing_required_flag_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("eval", "--database", "D") == (
        2,
        ["placerank: error: the following arguments are required: --out; see placerank eval --help"],
    )


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(cli, monkeypatch, capsys):
    import placerank.commands.models as models_cmd

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(models_cmd, "run", boom)
    from placerank.cli import main

    code = main(["models"])
    err = capsys.readouterr().err
    assert (code, err) == (2, "placerank: error: RuntimeError: something broke (--debug for the traceback)\n")
    assert main(["models", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(
        "placerank: error: RuntimeError: something broke\n"
    )


def test_os_error_names_the_file_and_the_cause(cli, monkeypatch, capsys):
    import errno

    import placerank.commands.models as models_cmd

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/results.json")

    monkeypatch.setattr(models_cmd, "run", full)
    assert cli("models") == (
        2,
        ["placerank: error: /data/out/results.json: no space left on device; free some space or write elsewhere"],
    )


def test_bad_option_values_are_one_line(cli, tmp_path):
    out = tmp_path / "o"
    for value, line in (
        ("threshold=inf", "fol-region option threshold: expected a number, got 'inf'"),
        ("num_regions=x", "fol-region option num_regions: expected a whole number, got 'x'"),
    ):
        argv = ["rerank", "--candidates", tmp_path, "--rerank", "fol-region", "--rerank-option", value, "--out", out]
        assert cli(*argv) == (2, [f"placerank: error: {line}"])
    assert not out.exists()


OUT_OF_RANGE = [
    # (--rerank, --rerank-option, the one expected line): the right type, outside the option's range
    ("fol-region", "threshold=1.5", "fol-region option threshold: must be a number in [-1, 1], got 1.5"),
    ("fol-region", "threshold=-2", "fol-region option threshold: must be a number in [-1, 1], got -2.0"),
    ("fol-region", "chunk=0", "fol-region option chunk: must be a whole number >= 1, got 0"),
    ("fol-region", "num_regions=-4", "fol-region option num_regions: must be a whole number >= 1, got -4"),
    ("fol-region", "min_matches=-1", "fol-region option min_matches: must be a whole number >= 0, got -1"),
    ("selavpr-mnn", "max_chunk_mb=0", "selavpr-mnn option max_chunk_mb: must be a number > 0, got 0.0"),
    ("selavpr-mnn", "min_matches=-2", "selavpr-mnn option min_matches: must be a whole number >= 0, got -2"),
    ("ransac-xfeat", "max_keypoints=0", "ransac-xfeat option max_keypoints: must be a whole number >= 1, got 0"),
    ("ransac-disk", "threshold_px=-1", "ransac-disk option threshold_px: must be a number > 0, got -1.0"),
    ("ransac-aliked", "confidence=1.5", "ransac-aliked option confidence: must be a number in (0, 1], got 1.5"),
    ("ransac-xfeat", "max_iters=0", "ransac-xfeat option max_iters: must be a whole number >= 1, got 0"),
    (
        "ransac-xfeat-lighterglue",
        "min_matches=-3",
        "ransac-xfeat-lighterglue option min_matches: must be a whole number >= 0, got -3",
    ),
]


@pytest.mark.parametrize("name, option, line", OUT_OF_RANGE, ids=[f"{n} {o}" for n, o, _ in OUT_OF_RANGE])
def test_out_of_range_option_values_are_one_line_before_any_work(name, option, line, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["rerank", "--candidates", "C", "--rerank", name, "--rerank-option", option, "--out", "O"]
    assert cli(*argv) == (2, [f"placerank: error: {line}"])
    argv = ["eval", "--database", "D", "--queries", "Q", "--out", "O", "--rerank", name, "--rerank-option", option]
    assert cli(*argv) == (2, [f"placerank: error: {line}"])
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_in_range_edges_pass_and_the_factories_check_too():
    from placerank.errors import PlaceRankError
    from placerank.rerank.base import create_reranker, reranker_options

    assert reranker_options("fol-region", ["threshold=-1", "chunk=1", "min_matches=0"]) == {
        "threshold": -1.0,
        "chunk": 1,
        "min_matches": 0,
    }
    assert reranker_options("ransac-xfeat", ["confidence=1", "max_keypoints=1"]) == {
        "confidence": 1.0,
        "max_keypoints": 1,
    }
    # the API path (no option strings): the factory refuses before it loads a network or needs a model
    with pytest.raises(
        PlaceRankError, match=r"^ransac-xfeat option max_keypoints: must be a whole number >= 1, got -5$"
    ):
        create_reranker("ransac-xfeat", max_keypoints=-5)
    with pytest.raises(PlaceRankError, match=r"^fol-region option chunk: must be a whole number >= 1, got 0$"):
        create_reranker("fol-region", model=None, chunk=0)
    with pytest.raises(PlaceRankError, match=r"^selavpr-mnn option max_chunk_mb: must be a number > 0, got -1$"):
        create_reranker("selavpr-mnn", model=None, max_chunk_mb=-1)
