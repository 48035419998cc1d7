"""SFRS training (placerank/train/sfrs.py, placerank/train/distributed.py) on real GardensPoint
frames: labels, mining, generations, resume, placerank checkpoints, and DDP == one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from placerank.errors import PlaceRankError
from placerank.train.common import TrainConfig, run_training
from placerank.train.sfrs_data import build_sfrs_data
from placerank.train.sfrs_options import SFRSOptions

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "generations": 2,
    "batch_tuples": 2,
    "queries_per_epoch": 4,
    "neg_num": 2,
    "pos_num": 2,
    "kmeans_images": 30,
    "pca_dim": 8,
    "pos_tolerance": 1,
    "neg_exclusion": 3,
    "extract_batch": 8,
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _traversals(gardens):
    return [str(gardens / t) for t in ("day_left", "day_right", "night_right")]


def test_options_are_typed_and_checked():
    o = SFRSOptions.parse({"generations": "3", "augment": "false", "temperatures": "0.07,0.06"})
    assert o.generations == 3 and o.augment is False and o.temperature_list == [0.07, 0.06]
    with pytest.raises(PlaceRankError, match=r"^unknown sfrs option 'gens'; known: augment, batch_tuples, "):
        SFRSOptions.parse({"gens": 2})
    with pytest.raises(PlaceRankError, match=r"^sfrs option neg_num: expected a whole number, got 'many'$"):
        SFRSOptions.parse({"neg_num": "many"})
    with pytest.raises(PlaceRankError, match=r"neg_exclusion \(1\) must be >= pos_tolerance \(2\)"):
        SFRSOptions.parse({"pos_tolerance": 2, "neg_exclusion": 1})


def test_backbone_choice_errors(gardens, tmp_path):
    from placerank.errors import WeightsError

    cfg = TrainConfig(
        method="sfrs", train=_traversals(gardens), out=tmp_path / "vgg", frames=(0, 12), backbone="vgg16", device="cpu"
    )
    with pytest.raises(WeightsError, match=r"^sfrs-vgg16 needs --weights: OpenIBL's vgg16_netvlad.pth"):
        run_training(cfg)
    cfg = TrainConfig(
        method="sfrs", train=_traversals(gardens), out=tmp_path / "r50", backbone="resnet50", device="cpu"
    )
    with pytest.raises(
        PlaceRankError,
        match=r"^sfrs trains on backbones effnet-lite0, effnet-lite1, effnet-lite2, sfrs-effnet-lite0, "
        r"sfrs-effnet-lite1, sfrs-effnet-lite2, sfrs-vgg16, vgg16; got 'resnet50'$",
    ):
        run_training(cfg)


def test_frame_and_place_labels(gardens, shared_data, tmp_path):
    opts = SFRSOptions.parse({"pos_tolerance": 1, "neg_exclusion": 3})
    d = build_sfrs_data(_traversals(gardens), (0, 20), opts)
    assert d.kind == "frame" and len(d.paths) == 60 and len(d.queries) == 60
    i = 5  # day_left frame 5; day_right frame k is image 20 + k, night_right frame k is 40 + k
    assert d.positives[i].tolist() == [24, 25, 26, 44, 45, 46]  # other traversals only, |df| <= 1
    allowed = np.flatnonzero(d.negative_ok[i])
    assert all(abs(int(d.labels[j]) - 5) > 3 for j in allowed)
    assert len(allowed) == 3 * (20 - 7)  # frames 2..8 excluded in every traversal
    # same place only (default pos_tolerance 0)
    d0 = build_sfrs_data(_traversals(gardens), (0, 20), SFRSOptions())
    assert d0.positives[i].tolist() == [25, 45]
    # place_id labels: positives share the place, every other place is a negative
    src = shared_data / "gardenspoint_sfu_triplets"
    rows = list(csv.DictReader(open(src / "manifest.csv")))
    man = tmp_path / "places.csv"
    with open(man, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "place_id"])
        w.writerows([(str(src / r["file"]), r["place_id"]) for r in rows])
    p = build_sfrs_data([str(man)], None, SFRSOptions())
    assert p.kind == "place" and len(p.paths) == 30
    assert all(len(x) == 2 for x in p.positives)
    assert p.negative_ok.sum(1).tolist() == [27] * 30


def _trainer(gardens, tmp_path, **opts):
    from placerank.train.distributed import DistContext
    from placerank.train.sfrs import SFRSTrainer

    cfg = TrainConfig(
        method="sfrs",
        train=_traversals(gardens),
        out=tmp_path / "run",
        frames=(0, 12),
        image_size=(64, 128),
        device="cpu",
        options={**TINY, "cache_frozen": True, **opts},
    )
    return SFRSTrainer(cfg, DistContext())


def test_mining_easiest_positive_hard_negatives_and_cache(gardens, tmp_path):
    tr = _trainer(gardens, tmp_path, neg_num=3, neg_pool=5, save_untrained=False)
    n = len(tr.data.paths)
    rng = np.random.default_rng(0)
    feats = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, 16))).float(), dim=1)
    chunk = tr.data.queries[:6]
    tuples = tr.miner.mine(feats, chunk, 0, np.random.default_rng(1))
    dist = 2 - 2 * (feats @ feats.T).double().numpy()
    for q, t in zip(chunk, tuples):
        pos = tr.data.positives[q]
        assert t["p"] == pos[np.argmin(dist[q, pos])]  # easiest positive
        assert all(tr.data.negative_ok[q, j] for j in t["negs"]) and len(t["negs"]) == 3
        assert np.all(np.diff(dist[q, t["negs"]]) >= 0)  # nearest first
        assert t["diffs"].tolist() == pos[np.argsort(dist[q, pos], kind="stable")][:2].tolist()
    # the cache: negatives found once stay candidates at the next visit (union with a new random
    # pool of 5), so the hardest negatives never get worse and converge to the 3 nearest allowed
    # images, which a pool of 5 alone holds all three of only ~2% of the time.
    worst = {t["q"]: dist[t["q"], t["negs"]].max() for t in tuples}
    for visit in range(30):
        again = tr.miner.mine(feats, chunk, 0, np.random.default_rng(2 + visit))
        for t in again:
            assert len(t["negs"]) == 3 and dist[t["q"], t["negs"]].max() <= worst[t["q"]] + 1e-12
            worst[t["q"]] = dist[t["q"], t["negs"]].max()
    for t in again:
        allowed = np.flatnonzero(tr.data.negative_ok[t["q"]])
        best3 = allowed[np.argsort(dist[t["q"], allowed], kind="stable")][:3]
        assert sorted(t["negs"].tolist()) == sorted(best3.tolist())
    # generation >= 1: difficult positives are a subset of the pool, chosen by re-ranking
    g1 = tr.miner.mine(feats, chunk, 1, np.random.default_rng(3))
    for q, t in zip(chunk, g1):
        assert set(t["diffs"].tolist()) <= set(tr.data.positives[q].tolist()) and len(t["diffs"]) <= 2

    # --max-minutes: stops after the first step and still writes a loadable model.pt
    tr.config.max_minutes = 0.0
    path = tr.train()
    extra = torch.load(path, weights_only=True)["extra"]
    assert extra["stopped_early"] is True and extra["generations_done"] == 0
    log = [json.loads(l) for l in (tr.run.path / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("event")] == ["generation_start", "time_limit"]


OPTS = {**TINY, "augment": True, "save_untrained": True}
# Held-out R@1 (GardensPoint day_right -> night_right frames 100-119, |i-j| <= 2) of the tiny
# two-generation run below: measured 0.35 (R@5 0.60, R@10 0.95), the same as its untrained start
# (4 steps move nothing measurable). Chance is ~0.23 (5 positives in 20); collapsed, identical
# descriptors score 0.15. The floor keeps one query of margin under the measured value.
MEASURED_FLOOR = 0.3


@pytest.fixture(scope="module")
def resumed_run(gardens, tmp_path_factory):
    """Generation 0, then the same run resumed with a second generation (in this process)."""
    import faiss

    old_t, old_f = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)  # as in the 1-thread torchrun processes it is compared with
    try:
        out = tmp_path_factory.mktemp("sfrs") / "run"
        cfg = TrainConfig(
            method="sfrs",
            train=_traversals(gardens),
            out=out,
            frames=(0, 12),
            image_size=(64, 128),
            device="cpu",
            epochs=1,
            options={**OPTS, "generations": 1},
        )
        assert run_training(cfg) == out / "model.pt"
        first = sorted(p.name for p in out.glob("*.pt"))
        cfg.options["generations"] = 2
        run_training(cfg)
    finally:
        torch.set_num_threads(old_t)
        faiss.omp_set_num_threads(old_f)
    return out, first


def test_train_generations_resume_and_model_pt(resumed_run, gardens, tmp_path):
    out, first = resumed_run
    assert first == ["checkpoint.pt", "gen0.pt", "init.pt", "model.pt", "untrained.pt"]
    assert (out / "gen1.pt").exists()
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    events = [(r.get("event"), r.get("gen")) for r in log if r.get("event")]
    # resumed with one more generation: generation 0 was not trained again
    assert events.count(("generation_start", 0)) == 1 and ("resume", 1) in events
    ends = {r["gen"]: r for r in log if r.get("event") == "epoch_end"}
    assert ends[0]["loss_soft"] == 0.0 and ends[0]["loss"] > 0
    assert ends[1]["loss_soft"] > 0 and ends[1]["loss"] == pytest.approx(
        ends[1]["loss_hard"] + 0.5 * ends[1]["loss_soft"], rel=1e-4
    )
    steps = [r for r in log if "step" in r and "event" not in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)

    from placerank.models import create

    m = create("sfrs-effnet-lite0", weights=out / "model.pt")
    assert m.descriptor_dim == 8 and m.preprocess.size == (64, 128) and not m.needs_data_init
    g0 = create("sfrs-effnet-lite0", weights=out / "gen0.pt")
    assert g0.weights_id != m.weights_id  # generation 1 was retrained from scratch with a teacher
    init = torch.load(out / "init.pt", weights_only=True)
    key = "backbone.body.net.blocks.0.0.conv_dw.weight"  # frozen stem: the same in every generation
    assert torch.equal(init[key], m.state_dict()[key])
    # placerank eval loads it
    from placerank.eval.evaluate import EvalConfig, evaluate

    for name, trav in (("db.csv", "day_right"), ("q.csv", "night_right")):  # held-out frames 100..119
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "frame"])
            w.writerows([(str(gardens / trav / f"Image{k:03d}.jpg"), k) for k in range(100, 120)])

    def held_out(weights):
        return evaluate(
            EvalConfig(
                database=tmp_path / "db.csv",
                queries=tmp_path / "q.csv",
                out=tmp_path / f"ev_{weights.stem}",
                model="sfrs-effnet-lite0",
                weights=weights,
                frame_tolerance=2,
                use_cache=False,
                num_examples=0,
                device="cpu",
            )
        )

    res = held_out(out / "model.pt")
    assert res.model["descriptor_dim"] == 8
    assert res.recall["1"] >= MEASURED_FLOOR and res.recall["10"] >= 0.9, res.recall


def test_ddp_two_processes_give_the_one_process_result(resumed_run, gardens, tmp_path):
    """torchrun with 2 gloo processes (each on half of every step's tuples) == the 1-process
    run above (which was, in addition, interrupted and resumed between the generations)."""
    ref, _ = resumed_run
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "placerank.cli",
        "train",
        "--preset",
        "none",  # TrainConfig's bare defaults, as the in-process run above (not the sfrs-cpu recipe)
        "--method",
        "sfrs",
        "--train",
        *_traversals(gardens),
        "--frames",
        "0",
        "12",
        "--image-size",
        "64",
        "128",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "ddp"),
    ]
    for k, v in {**OPTS, "save_untrained": False}.items():
        args += ["--option", f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    init = torch.load(ref / "init.pt", weights_only=True)
    assert max((a[k].float() - init[k].float()).abs().max().item() for k in init) > 1e-4  # it trained ...
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4  # ... identically
    la = [json.loads(l)["loss"] for l in (ref / "log.jsonl").read_text().splitlines() if '"step"' in l]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines() if '"step"' in l]
    assert len(la) == len(lb) == 4 and np.allclose(la, lb, rtol=1e-4)


def test_validation_picks_model_pt_over_generations(gardens, tmp_path):
    """With a validation pair, every epoch of every generation is scored on it and model.pt is
    the best one (R@5, ties R@1), not simply the last generation."""
    from placerank.train.common import ValidationSet

    for name, trav in (("vdb.csv", "day_right"), ("vq.csv", "night_right")):  # frames 40..51, not trained on
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "frame"])
            w.writerows([(str(gardens / trav / f"Image{k:03d}.jpg"), k) for k in range(40, 52)])
    opts = {
        **TINY,
        "cache_frozen": True,
        "save_untrained": False,
        "val_database": str(tmp_path / "vdb.csv"),
        "val_queries": str(tmp_path / "vq.csv"),
        "val_frame_tolerance": 1,
    }
    cfg = TrainConfig(
        method="sfrs",
        train=_traversals(gardens),
        out=tmp_path / "run",
        frames=(0, 12),
        image_size=(64, 128),
        device="cpu",
        epochs=1,
        options=opts,
    )
    path = run_training(cfg)
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in log if r.get("event") == "validation"]
    assert [(r["gen"], r["epoch"]) for r in vals] == [(0, 0), (1, 0)]
    val = ValidationSet.from_options(opts["val_database"], opts["val_queries"], frame_tolerance=1)
    best = max(vals, key=lambda r: (val.key(r["recall"]), -r["gen"]))
    extra = torch.load(path, weights_only=True)["extra"]
    assert extra["best"] == {"gen": best["gen"], "epoch": best["epoch"], "recall": best["recall"]}
    assert extra["generations_done"] == 2 and extra["stopped_early"] is False
