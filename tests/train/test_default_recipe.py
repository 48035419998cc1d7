"""``placerank train --method M --train DATA`` with no other option: the method's CPU recipe
supplies the settings (not the data), part of the user's data is held out automatically for
best-epoch selection and early stopping, and the default run improves recall on frames it
never saw (real GardensPoint frames)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from placerank.commands import train as train_cmd
from placerank.data.places import read_training_set
from placerank.data.readers import load_dataset
from placerank.train.auto_split import GAP, auto_split, held_count

TRAVERSALS = ("day_left", "day_right", "night_right")


def _args(argv):
    ap = argparse.ArgumentParser()
    train_cmd.register(ap.add_subparsers())
    return ap.parse_args(["train", *argv])


def _settings(argv):
    return train_cmd.train_settings(_args(argv))


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_no_flags_take_the_methods_recipe_but_the_users_data(gardens, tmp_path):
    data = [str(gardens / t) for t in TRAVERSALS]
    fol = _settings(["--method", "fol", "--train", *data])
    # fol-cpu's settings, the 20-minute budget, epochs that time (not the count) ends
    assert (fol["image_size"], fol["lr"], fol["max_minutes"], fol["epochs"]) == ((240, 432), 3e-4, 20.0, 1000)
    assert fol["options"] == {"lr_decay_iters": "600", "val_select_n": "5", "val_patience": "3"}
    assert fol["train"] == data and fol.get("frames") is None  # the user's data, not the preset's
    assert str(fol["out"]) == "runs/fol" and fol["device"] == "auto"
    sela = _settings(["--method", "selavpr", "--train", *data, "--lr", "2e-4", "--option", "val_patience=5"])
    assert sela["lr"] == 2e-4 and sela["image_size"] == (224, 400)  # a flag overrides one setting
    assert sela["options"]["val_patience"] == "5" and sela["options"]["queries_per_loop"] == "120"
    assert sela["options"]["val_select_n"] == "1"  # global R@1: what the selavpr-cpu recipe selected on
    assert "val_database" not in sela["options"]  # the preset's validation pair is not taken
    sfrs = _settings(["--method", "sfrs", "--train", *data, "--max-minutes", "5"])
    assert (sfrs["epochs"], sfrs["max_minutes"], sfrs["options"]["generations"]) == (3, 5.0, "2")
    # another backbone: the CNN recipe's input size and lr do not apply, the run length does
    vit = _settings(["--method", "fol", "--backbone", "dinov2-vits14", "--train", *data])
    assert vit.get("image_size") is None and vit.get("lr") is None and vit["max_minutes"] == 20.0
    bare = _settings(["--method", "fol", "--preset", "none", "--train", *data, "--out", "r"])
    assert (bare["epochs"], bare["options"], bare.get("max_minutes")) == (1, {}, None)  # the old defaults


def test_frame_split_of_gardenspoint_traversals(gardens, tmp_path):
    """140 frames x 3 traversals: the last 21 (15 %) held out, 3 more dropped, no training frame
    within the validation tolerance of a validation frame."""
    data = [str(gardens / t) for t in TRAVERSALS]
    split = auto_split(data, None, tmp_path)
    assert held_count(140) == 21 and split.frames == (0, 116)
    assert split.summary["validation_frames"] == [119, 140] and split.train == data
    db, q = _rows(split.options["val_database"]), _rows(split.options["val_queries"])
    assert [Path(r["path"]).parent.name for r in db] == ["day_left"] * 21
    assert [Path(r["path"]).parent.name for r in q] == ["night_right"] * 21
    assert [int(r["frame"]) for r in q] == list(range(119, 140))
    trained = read_training_set(split.train, split.frames)
    held = {Path(r["path"]) for r in db + q}
    assert not held & set(trained.paths)
    train_frames = np.array(sorted({int(p) for p in trained.positions.tolist()}))
    assert train_frames.max() == 115 and 119 - train_frames.max() == GAP + 1 > int(split.options["val_frame_tolerance"])
    val = load_dataset(split.options["val_database"], split.options["val_queries"], frame_tolerance=2)
    assert all(len(p) for p in val.positives)  # every validation query has a positive
    assert json.loads((tmp_path / "split" / "split.json").read_text())["train_frames"] == [0, 116]
    # the user's --frames: the split is taken inside it; too few frames: no validation
    assert auto_split(data, (0, 100), tmp_path / "b").summary["validation_frames"] == [80, 100]
    small = auto_split(data, (0, 29), tmp_path / "c")
    assert small.options == {} and small.frames == (0, 29) and small.message.startswith("validation: none")
    assert not (tmp_path / "c").exists()
    assert auto_split(data[:1], None, tmp_path / "d").options == {}  # one traversal: no query side


def test_place_split_of_a_place_csv(gardens, tmp_path):
    """A path,place_id CSV of 40 places (day_left + night_right views): the last 20 places
    (held_count: max(15 %, 20), at most a third -> 13) held out, first view database."""
    manifest = tmp_path / "places.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "place_id"])
        for k in range(40):
            for t in ("day_left", "night_right"):
                w.writerow([gardens / t / f"Image{k:03d}.jpg", f"p{k:02d}"])
    split = auto_split([str(manifest)], None, tmp_path / "run")
    assert held_count(40) == 13 and split.summary["validation_places"] == 13
    db, q = _rows(split.options["val_database"]), _rows(split.options["val_queries"])
    assert [r["place_id"] for r in db] == [f"p{k:02d}" for k in range(27, 40)] == [r["place_id"] for r in q]
    assert all("day_left" in r["path"] for r in db) and all("night_right" in r["path"] for r in q)
    kept = _rows(split.train[0])
    assert {r["place_id"] for r in kept} == {f"p{k:02d}" for k in range(27)} and len(kept) == 54
    assert auto_split([str(manifest)], None, tmp_path / "r2").train != [str(manifest)]
    few = tmp_path / "few.csv"
    few.write_text("".join(l for l in manifest.read_text().splitlines(True)[: 1 + 2 * 29]))
    assert auto_split([str(few)], None, tmp_path / "r3").options == {}  # 29 places: train without


def test_the_command_records_the_split(gardens, tmp_path, capsys):
    """The split reaches the run's config (val_* options, training frames) and log; too little
    data is one printed line; --validation none turns it off."""
    data = [str(gardens / t) for t in TRAVERSALS]
    settings = _settings(["--method", "fol", "--train", *data, "--out", str(tmp_path / "r")])
    assert train_cmd.wants_auto_split(_args(["--method", "fol", "--train", *data]), settings)
    assert not train_cmd.wants_auto_split(_args(["--method", "fol", "--validation", "none", "--train", "x"]), settings)
    given = {**settings, "options": {**settings["options"], "val_database": "a", "val_queries": "b"}}
    assert not train_cmd.wants_auto_split(_args(["--method", "fol", "--train", *data]), given)
    line = train_cmd.apply_auto_split(settings)
    assert line.startswith("validation: frames 119-139 held out (day_left database, night_right queries")
    assert settings["frames"] == (0, 116) and settings["options"]["val_frame_tolerance"] == "2"
    record = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert record["event"] == "validation_split" and record["validation_frames"] == [119, 140]


def _unseen_recall(tmp_path, gardens, weights, db_traversal: str) -> dict[str, float]:
    """R@N of FoL's global descriptor on GardensPoint frames 100-139 — neither trained on nor
    validated on (the run trains on frames 0-99, of which the split holds out 80-99):
    database ``db_traversal``, queries night_right, |i - j| <= 2."""
    from placerank.eval.evaluate import EvalConfig, evaluate

    for name, trav in (("db.csv", db_traversal), ("q.csv", "night_right")):
        rows = "".join(f"{gardens / trav / f'Image{k:03d}.jpg'},{k}\n" for k in range(100, 140))
        (tmp_path / name).write_text("path,frame\n" + rows)
    res = evaluate(
        EvalConfig(
            database=tmp_path / "db.csv",
            queries=tmp_path / "q.csv",
            out=tmp_path / f"ev_{Path(weights).parent.name}_{db_traversal}",
            model="fol-effnet-lite0",
            weights=weights,
            image_size=SIZE,
            frame_tolerance=2,
            use_cache=False,
            num_examples=0,
            device="cpu",
            num_workers=0,
        )
    )
    return res.recall


SIZE = (128, 224)
STEPS = 25
# MEASURED FLOOR (benchmarks/results/default_training.json): unseen day_right -> night_right R@1
# 0.475 untrained -> 0.75 (step 9 selected; validation R@1 0.90, 0.95, 0.95, 0.90 at steps 0, 9,
# 18, 25). The floor keeps a 0.175 margin (7 of 40 queries); the FoL test in test_fol.py measured
# gains >= 0.15 after 25 steps for seeds 0-4.
GAIN_FLOOR = 0.1


@pytest.mark.slow
def test_default_training_beats_the_untrained_start_on_unseen_frames(gardens, tmp_path, single_thread):
    """THE BEHAVIOUR THAT MATTERS: `placerank train --method fol --train <3 traversals> --frames
    0 100` with the defaults (fol-cpu settings, automatic split: validation frames 80-99,
    training frames 0-76), cut to STEPS steps at a small input size so it runs in a test, raises
    R@1 on frames 100-139 over the untrained start (the same seed's weights before step 1: what
    `--epochs 0` saves). The traversals are given day_right first, so the validation pair is
    day_right -> night_right, the protocol scored here. With day_left first (the lateral shift)
    the same 25 steps lower validation R@1 (0.75 -> 0.5) and the selection keeps the start —
    measured, and written up in docs/training.md. Runtime: 265 s on 2 cores under load ~20
    (about 7 s of training when the machine is free, test_fol.py); hence marked slow."""
    from placerank.train.common import TrainConfig, run_training

    data = [str(gardens / t) for t in ("day_right", "day_left", "night_right")]  # validation: day_right -> night_right
    run = tmp_path / "default"
    argv = ["--method", "fol", "--train", *data, "--frames", "0", "100", "--image-size", *map(str, SIZE)]
    argv += ["--option", f"max_steps={STEPS}", "--option", "val_every_minutes=0", "--workers", "0", "--out", str(run)]
    args = _args(argv)
    assert args.func(args) == 0
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "validation_split" and log[0]["train_frames"] == [0, 77]
    checks = [r for r in log if r.get("event") == "validation"]
    assert checks[0]["step"] == 0 and checks[-1]["step"] == STEPS  # the start and the last step are candidates
    untrained = run_training(
        TrainConfig(
            method="fol", train=data, out=tmp_path / "untrained", frames=(0, 77), image_size=SIZE, epochs=0,
            device="cpu", num_workers=0,
        )
    )  # fmt: skip
    before = _unseen_recall(tmp_path, gardens, untrained, "day_right")
    after = _unseen_recall(tmp_path, gardens, run / "model.pt", "day_right")
    print("unseen day_right -> night_right", before, after, [(r["step"], r["recall"]) for r in checks])
    assert after["1"] >= before["1"] + GAIN_FLOOR, (before, after)
