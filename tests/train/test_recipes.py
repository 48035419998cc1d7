"""Training presets (placerank/presets/recipes.py) and `placerank train --preset`: the recipe
settings, flags overriding them, and the data specs they name (read from the shared data)."""

from __future__ import annotations

import argparse

import pytest

from placerank.commands import train as train_cmd
from placerank.data.places import read_training_places, read_training_set, split_spec
from placerank.errors import DataError, PlaceRankError
from placerank.presets import get_preset, list_presets
from placerank.train.common import place_groups


def _settings(argv):
    ap = argparse.ArgumentParser()
    train_cmd.register(ap.add_subparsers())
    return train_cmd.train_settings(ap.parse_args(["train", *argv]))


def test_presets_hold_the_recipe_settings(shared_data):
    assert {e.name for e in list_presets("train")} >= {"fol-cpu", "selavpr-cpu", "sfrs-cpu"}
    fol = _settings(["--preset", "fol-cpu", "--data", str(shared_data)])
    assert (fol["method"], fol["image_size"], fol["lr"], fol["max_minutes"], fol["frames"]) == (
        "fol",
        (240, 432),
        3e-4,
        20.0,
        (0, 100),
    )
    assert fol["options"] == {"lr_decay_iters": "600"} and fol["num_workers"] == 1
    assert fol["train"][-1] == f"{shared_data}/nordland_seqslam_64x32?places=300"
    sela = _settings(["--preset", "selavpr-cpu", "--data", str(shared_data), "--out", "/tmp/x", "--epochs", "2"])
    assert sela["epochs"] == 2 and str(sela["out"]) == "/tmp/x"  # the user's flags win
    assert sela["options"]["val_frames"] == "80,100" and sela["options"]["val_select_n"] == "1"
    assert sela["options"]["val_database"] == str(shared_data / "gardenspoint_walking" / "day_right")
    sfrs = _settings(["--preset", "sfrs-cpu", "--option", "pos_tolerance=2", "--frames", "0", "40"])
    assert sfrs["options"]["pos_tolerance"] == "2" and sfrs["options"]["generations"] == "2"
    assert sfrs["frames"] == (0, 40) and sfrs["lr"] == 0.01 and sfrs["image_size"] == (224, 384)
    with pytest.raises(PlaceRankError, match=r"^train needs --train \(or --preset NAME\)$"):
        _settings(["--method", "fol", "--out", "x"])
    with pytest.raises(PlaceRankError, match=r"^unknown preset 'fol-gpu'; known presets: "):
        get_preset("fol-gpu")


def test_fol_preset_data_matches_the_old_manifest(shared_data):
    """GardensPoint folders + the Nordland selection give the places of fol_prepare.py's
    manifest (``gp<k>`` / ``nl<index>`` ids), group for group, in the sampler's order."""
    fol = _settings(["--preset", "fol-cpu", "--data", str(shared_data)])
    places = read_training_set(fol["train"], fol["frames"])
    groups = place_groups(places)
    assert len(places) == 900 and len(groups) == 400
    gardens = shared_data / "gardenspoint_walking"
    first = [places.paths[i] for i in groups[0]]
    assert first == [gardens / t / "Image000.jpg" for t in ("day_left", "day_right", "night_right")]
    last = [p.parent.name for p in (places.paths[i] for i in groups[-1])]
    assert last == ["database_summer", "queries_winter"]


def test_nordland_selection_spec(shared_data):
    nl = shared_data / "nordland_seqslam_64x32"
    s = read_training_places([f"{nl}?places=10&start=200&step=3"])
    assert len(s) == 20 and s.positions[0] == s.positions[1] and s.positions[0].startswith("nl")
    assert int(s.positions[2][2:]) > int(s.positions[0][2:]) >= 200
    assert split_spec(f"{nl}?places=3") == (nl, {"places": 3})
    with pytest.raises(DataError, match=r"unknown selection 'seasons=2' \(known: places, start, step, as KEY=N\)$"):
        read_training_places([f"{nl}?seasons=2"])
    with pytest.raises(DataError, match=r"selection places expects a whole number, got 'many'$"):
        read_training_places([f"{nl}?places=many"])
