"""``placerank demo --preset gardens-night`` (the default) runs today's demo: same data, rule,
model, re-ranker and top-K; presets are listed by ``placerank models``."""

from __future__ import annotations

import pytest

import placerank.commands.eval as eval_cmd
import placerank.eval.evaluate as evaluate_mod
from placerank.cli import main


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_evaluate(cfg, model=None):
        seen["cfg"] = cfg
        return "result"

    monkeypatch.setattr(evaluate_mod, "evaluate", fake_evaluate)
    monkeypatch.setattr(eval_cmd, "print_summary", lambda result, out: seen.setdefault("summary", (result, out)))
    return seen


def test_default_preset_is_the_gardens_night_demo(captured, capsys, gardens, shared_data, monkeypatch):
    monkeypatch.delenv("PLACERANK_DATA", raising=False)
    assert main(["demo", "--data", str(shared_data), "--out", "o"]) == 0
    cfg = captured["cfg"]
    assert (cfg.database, cfg.queries) == (gardens / "day_right", gardens / "night_right")
    assert (cfg.model, cfg.rerank, cfg.top_k, cfg.frame_tolerance, cfg.radius) == (
        "effnet-lite0-gem",
        "ransac-xfeat",
        10,
        2,
        None,
    )
    assert capsys.readouterr().out == (
        f"placerank demo: database {gardens / 'day_right'} (day), queries {gardens / 'night_right'} (night), "
        "positives |i-j| <= 2, model effnet-lite0-gem, re-rank top-10 with ransac-xfeat\n"
    )
    assert (
        main(["demo", "--preset", "gardens-day", "--data", str(shared_data), "--rerank", "none", "--top-k", "5"]) == 0
    )
    cfg = captured["cfg"]
    assert (cfg.database, cfg.queries, cfg.rerank, cfg.top_k) == (gardens / "day_left", gardens / "day_right", None, 5)


def test_unknown_or_wrong_kind_of_preset_is_one_line(capsys):
    assert main(["demo", "--preset", "fol-cpu"]) == 2
    assert capsys.readouterr().err == (
        "placerank: error: preset 'fol-cpu' is a train preset, not a dataset preset; "
        "dataset presets: gardens-day, gardens-night\n"
    )


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dataset presets (placerank demo --preset):" in out and "  gardens-night " in out
