"""FoL training end to end on a GSV-Cities-layout folder built from real shared images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from placerank.data.gsv_cities import read_gsv_cities
from placerank.errors import DataError, PlaceRankError

HEADER = "place_id,year,month,northdeg,city_id,lat,lon,panoid\n"


def _gsv_name(city_id, place, year, month, north, lat, lon, pano):
    # the naming convention GSV-Cities ships with (README of the dataset)
    return f"{city_id}_{place:07d}_{year:04d}_{month:02d}_{north:03d}_{lat}_{lon}_{pano}.jpg"


def make_gsv(root: Path, shared_data: Path, places: int = 6) -> Path:
    """City 'GardensPoint': place k = frame 10k seen from day_left, day_right, night_right and
    day_left at frame 10k+1 (4 images); place 99 has only 2 images (dropped by min_images=4)."""
    gp = shared_data / "gardenspoint_walking"
    (root / "Dataframes").mkdir(parents=True)
    img_dir = root / "Images" / "GardensPoint"
    img_dir.mkdir(parents=True)
    lines = [HEADER]
    views = [
        ("day_left", 0, 2016, 3),
        ("day_right", 0, 2018, 11),
        ("night_right", 0, 2019, 7),
        ("day_left", 1, 2014, 1),
    ]
    for k in range(places):
        for v, (trav, off, year, month) in enumerate(views):
            lat, lon, pano = -27.4770 + 0.001 * k + 1e-6 * v, 153.0281, f"pano{k}x{v}"
            name = _gsv_name("GardensPoint", k, year, month, 90 + v, lat, lon, pano)
            shutil.copy(gp / trav / f"Image{10 * k + off:03d}.jpg", img_dir / name)
            lines.append(f"{k},{year},{month},{90 + v},GardensPoint,{lat},{lon},{pano}\n")
    for v, trav in enumerate(("day_left", "day_right")):
        name = _gsv_name("GardensPoint", 99, 2020, 1, 7, -27.5, 153.1, f"p99x{v}")
        shutil.copy(gp / trav / "Image139.jpg", img_dir / name.replace(".jpg", ".JPG"))
        lines.append(f"99,2020,1,7,GardensPoint,-27.5,153.1,p99x{v}\n")
    (root / "Dataframes" / "GardensPoint.csv").write_text("".join(lines))
    return root


def test_gsv_cities_reader(tmp_path, shared_data):
    root = make_gsv(tmp_path / "gsv", shared_data)
    s = read_gsv_cities(root)
    assert s.kind == "place" and len(s) == 24
    assert sorted(set(s.positions.tolist())) == [f"GardensPoint/{k}" for k in range(6)]
    assert s.latlon.shape == (24, 2) and abs(s.latlon[0, 0] + 27.477) < 0.01
    # the 2-image place is kept when the minimum allows it (file found despite the .JPG extension)
    assert len(read_gsv_cities(root, min_images=2)) == 26
    # FoL's deterministic choice: the most recent images by (year, month, lat)
    two = read_gsv_cities(root, images_per_place=2)
    first = [p.name for p, l in zip(two.paths, two.positions) if l == "GardensPoint/0"]
    assert [n.split("_")[2] for n in first] == ["2019", "2018"]
    with pytest.raises(DataError, match=r"Madrid.csv: city dataframe does not exist$"):
        read_gsv_cities(root, cities=["Madrid"])
    with pytest.raises(DataError, match=r"not a GSV-Cities folder \(expected Dataframes/\*\.csv and Images/<city>/\)$"):
        read_gsv_cities(tmp_path)
    victim = sorted((root / "Images" / "GardensPoint").glob("*_0000003_*"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"GardensPoint.csv: 1 listed image\(s\) do not exist, e\.g\. .*_0000003_"):
        read_gsv_cities(root)
    (root / "Dataframes" / "GardensPoint.csv").write_text("place_id,year,lat\n1,2020,3.0\n")
    with pytest.raises(
        DataError, match=r"not a GSV-Cities dataframe \(missing column\(s\) month, northdeg, city_id, lon, panoid\)$"
    ):
        read_gsv_cities(root)


def test_train_cli_on_gsv_resume_and_eval(tmp_path, shared_data, gardens):
    from placerank.cli import main

    root = make_gsv(tmp_path / "gsv", shared_data)
    run = tmp_path / "run"
    args = [
        "train",
        "--method",
        "fol",
        "--backbone",
        "effnet-lite0",
        "--train",
        str(root),
        "--out",
        str(run),
        "--image-size",
        "128",
        "224",
        "--places-per-batch",
        "3",
        "--images-per-place",
        "2",
        "--workers",
        "0",
        "--lr",
        "1e-4",
        "--option",
        "lr_decay_iters=4",
    ]
    assert main(args + ["--epochs", "1"]) == 0
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r and "loss" in r]
    assert len(steps) == 2  # 6 places / 3 per batch
    for key in ("ms", "local", "kl1", "kl2", "cel", "ws", "ws_pairs", "triplets", "lr"):
        assert key in steps[0]
    assert all(np.isfinite(r["loss"]) for r in steps) and steps[0]["triplets"] == 6
    assert steps[1]["lr"] < steps[0]["lr"]  # linear decay, stepped per iteration
    assert (run / "checkpoint.pt").exists() and (run / "model.pt").exists()
    first = torch.load(run / "model.pt", weights_only=True)["state_dict"]["upconv.weight"].clone()

    assert main(args + ["--epochs", "2"]) == 0  # resumes at epoch 2
    log = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["epoch"] == 1 and r["step"] == 2 for r in log)
    assert [r["step"] for r in log if "ms" in r] == [1, 2, 3, 4]
    assert steps[-1]["lr"] > [r for r in log if "ms" in r][-1]["lr"] == pytest.approx(1e-5)  # factor 0.1 reached
    second = torch.load(run / "model.pt", weights_only=True)
    assert second["placerank"]["model"] == "fol-effnet-lite0"
    assert second["placerank"]["kwargs"]["image_size"] == [128, 224]
    assert not torch.equal(second["state_dict"]["upconv.weight"], first)  # it trained

    # the placerank checkpoint loads with `placerank eval --model fol-effnet-lite0 --weights RUN/model.pt`
    out = tmp_path / "eval"
    db = tmp_path / "db.csv"
    q = tmp_path / "q.csv"
    db.write_text(
        "path,frame\n" + "".join(f"{gardens / 'day_right' / f'Image{k:03d}.jpg'},{k}\n" for k in range(100, 110))
    )
    q.write_text(
        "path,frame\n" + "".join(f"{gardens / 'day_left' / f'Image{k:03d}.jpg'},{k}\n" for k in range(100, 104))
    )
    assert (
        main(
            [
                "eval",
                "--database",
                str(db),
                "--queries",
                str(q),
                "--model",
                "fol-effnet-lite0",
                "--weights",
                str(run / "model.pt"),
                "--rerank",
                "fol-region",
                "--top-k",
                "5",
                "--frame-tolerance",
                "2",
                "--workers",
                "0",
                "--examples",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["name"] == "fol-effnet-lite0" and res["model"]["input_size"] == [128, 224]
    assert res["rerank"]["name"] == "fol-region"
    assert res["rerank"]["bytes_per_image"] == pytest.approx(8 * 14 * 268, rel=0.01)  # 112 patches at 128x224


def test_train_option_errors(tmp_path, gardens):
    from placerank.train.common import TrainConfig, run_training

    cfg = TrainConfig(method="fol", train=[str(gardens / "day_left")], out=tmp_path / "r", options={"w_foo": 1})
    with pytest.raises(PlaceRankError, match=r"^unknown fol option 'w_foo'; known: "):
        run_training(cfg)
    cfg = TrainConfig(method="fol", train=[str(gardens / "day_left")], out=tmp_path / "r", backbone="vgg16")
    with pytest.raises(PlaceRankError, match=r"^fol cannot train on backbone 'vgg16'; use one of: effnet-lite0, "):
        run_training(cfg)
    cfg = TrainConfig(method="fol", train=[str(gardens / "day_left")], out=tmp_path / "r", images_per_place=1)
    with pytest.raises(PlaceRankError, match=r"^fol needs --images-per-place >= 2"):
        run_training(cfg)


def _held_out_recall(tmp_path, gardens, weights) -> dict[str, float]:
    """R@N of FoL's global descriptor on GardensPoint frames 100-139 (never trained on):
    database day_right, queries night_right, |i - j| <= 2."""
    from placerank.eval.evaluate import EvalConfig, evaluate

    for name, trav in (("db.csv", "day_right"), ("q.csv", "night_right")):
        rows = "".join(f"{gardens / trav / f'Image{k:03d}.jpg'},{k}\n" for k in range(100, 140))
        (tmp_path / name).write_text("path,frame\n" + rows)
    res = evaluate(
        EvalConfig(
            database=tmp_path / "db.csv",
            queries=tmp_path / "q.csv",
            out=tmp_path / f"ev_{Path(weights).parent.name}",
            model="fol-effnet-lite0",
            weights=weights,
            image_size=(128, 224),
            frame_tolerance=2,
            use_cache=False,
            num_examples=0,
            device="cpu",
            num_workers=0,
        )
    )
    return res.recall


def test_short_real_run_improves_held_out_recall(tmp_path, gardens):
    """25 real FoL steps (8 places x 2 views of GardensPoint frames 0-99, the three traversals,
    lr 3e-4) raise held-out day -> night R@1 over the same model before training (epochs=0
    saves the untrained start: same seed, same random heads). Measured on 2 cores (~7 s of
    training when the machine is free), R@1 before -> after for seeds 0-4: 0.475 -> 0.825,
    0.775 -> 0.925, 0.55 -> 0.90, 0.65 -> 0.80, 0.65 -> 0.975 (gain >= 0.15, after >= 0.80;
    R@5 0.90-0.975 -> 1.0). The test runs seed 0 with margins that every seed met."""
    from placerank.train.common import TrainConfig, run_training

    def train(name: str, epochs: int) -> Path:
        cfg = TrainConfig(
            method="fol",
            train=[str(gardens / t) for t in ("day_left", "day_right", "night_right")],
            out=tmp_path / name,
            frames=(0, 100),
            image_size=(128, 224),
            epochs=epochs,
            lr=3e-4,
            device="cpu",
            num_workers=0,
            options={"max_steps": "25", "lr_decay_iters": "600"},
        )
        return run_training(cfg)

    before = _held_out_recall(tmp_path, gardens, train("untrained", 0))
    trained = train("trained", 50)
    steps = [json.loads(l) for l in (tmp_path / "trained" / "log.jsonl").read_text().splitlines() if '"ms"' in l]
    assert len(steps) == 25
    after = _held_out_recall(tmp_path, gardens, trained)
    assert after["1"] >= before["1"] + 0.1, (before, after)
    assert after["1"] >= 0.7 and after["5"] >= before["5"], (before, after)


def test_official_defaults_for_vit_and_cnn_local_modes(tmp_path, shared_data):
    """fol-vit*: dense test-time sets and dense triplet-loss sets (the official choice); the CNN
    keeps the measured CPU defaults (pool3 / center). GSV-Cities: the K most recent per place."""
    from placerank.train.common import TrainConfig
    from placerank.train.fol import fol_options, read_places, resolve_local_modes

    opts, _ = fol_options({})
    assert resolve_local_modes("fol-vitl14", opts) == ("dense", "dense")
    assert resolve_local_modes("fol-vitb14", opts) == ("dense", "dense")
    assert resolve_local_modes("fol-effnet-lite0", opts) == ("pool3", "center")
    opts, _ = fol_options({"train_local_mode": "pool3", "local_mode": "center"})
    assert resolve_local_modes("fol-vitl14", opts) == ("center", "pool3")
    with pytest.raises(PlaceRankError, match=r"^unknown train_local_mode 'x' \(known: center, pool3, dense\)$"):
        resolve_local_modes("fol-vitl14", fol_options({"train_local_mode": "x"})[0])

    root = make_gsv(tmp_path / "gsv", shared_data, places=3)
    cfg = TrainConfig(method="fol", train=[str(root)], out=tmp_path / "r", images_per_place=2)
    recent = read_places(cfg, fol_options({})[0])
    assert len(recent) == 6 and sorted(p.name.split("_")[2] for p in recent.paths[:2]) == ["2018", "2019"]
    assert len(read_places(cfg, fol_options({"gsv_recent": "false"})[0])) == 12
