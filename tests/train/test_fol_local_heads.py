"""FoL's local supervision on the CNN (train/losses/fol_adapt.py): the relative miner finds
pseudo-correspondences on real GardensPoint feature maps where the official rules find none, the
official backbones keep the spec's settings, and per-term gradient norms are logged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from placerank.data.images import load_tensor
from placerank.errors import PlaceRankError
from placerank.train.losses.fol import FoLCriterion, FoLLossConfig, mine_pseudo_correspondences
from placerank.train.losses.fol_adapt import CNN_LOSS_DEFAULTS, adapt_loss_config, term_grad_norms

pytestmark = pytest.mark.usefixtures("single_thread")
FRAMES = (20, 60, 100, 130)


@pytest.fixture(scope="module")
def gardens_outputs(make_model, gardens):
    """Untrained-head fol-effnet-lite0 (ImageNet backbone) on day_right / night_right frames."""
    model = make_model("fol-effnet-lite0", image_size=(240, 432))
    out = {}
    with torch.no_grad():
        for t in ("day_right", "night_right"):
            x = torch.stack([load_tensor(gardens / t / f"Image{k:03d}.jpg", model.preprocess)[0] for k in FRAMES])
            out[t] = model.run(x)
    return out


def _mine(outs, cfg):
    oi, oj = outs["day_right"], outs["night_right"]
    fi, fj = (F.normalize(o.feature_map.flatten(2), dim=1) for o in (oi, oj))
    return [
        mine_pseudo_correspondences(fi[k], fj[k], oi.plan[k], oj.plan[k], oi.attention_thr[k], cfg)
        for k in range(len(FRAMES))
    ]


def test_relative_miner_yields_healthy_pairs_on_real_lite0_maps(gardens_outputs):
    w = gardens_outputs["day_right"].grid[1]  # 15 x 27 patches at 240 x 432
    official = _mine(gardens_outputs, FoLLossConfig())
    assert sum(map(len, official)) <= len(FRAMES)  # the starvation: measured 0 pairs
    cnn = adapt_loss_config(FoLLossConfig(), "fol-effnet-lite0")
    pairs = _mine(gardens_outputs, cnn)
    counts = [len(p) for p in pairs]
    assert min(counts) >= 16 and sum(counts) >= 100  # measured [32, 32, 23, 32] (32 = the cap)
    assert max(counts) <= cnn.ws_max_per_image
    # same camera side, day vs night: true matches keep their image row (random pairs: 19 %)
    rows = [abs(a // w - b // w) <= 1 for p in pairs for a, b, _ in p]
    assert sum(rows) / len(rows) >= 0.7  # measured 0.83
    for p in pairs:  # most similar first, every one above the mutual floor
        sims = [s for _, _, s in p]
        assert sims == sorted(sims, reverse=True) and min(sims) > cnn.ws_mutual_min_cos


def test_official_backbones_keep_the_spec_defaults():
    spec = FoLLossConfig()
    assert (spec.ws_miner, spec.ws_cells, spec.ws_assign_threshold, spec.ws_min_cos, spec.ws_ratio) == (
        "official",
        "official",
        0.1,
        0.8,
        2.0,
    )
    assert (spec.ws_max_per_image, spec.ws_scale, spec.ws_drop_first_anchor, spec.local_margin) == (5, 0.01, True, 0.0)
    for name in ("fol-vits14", "fol-vitb14", "fol-vitl14"):
        assert adapt_loss_config(spec, name) == spec
    cnn = adapt_loss_config(spec, "fol-effnet-lite0")
    assert {k: getattr(cnn, k) for k in CNN_LOSS_DEFAULTS} == CNN_LOSS_DEFAULTS
    # a key the user gave keeps the user's value
    mine = adapt_loss_config(FoLLossConfig(ws_scale=0.01), "fol-effnet-lite0", ["ws_scale=0.01"])
    assert mine.ws_scale == 0.01 and mine.ws_miner == "relative"
    with pytest.raises(PlaceRankError, match="ws_miner must be one of official, relative"):
        FoLCriterion(FoLLossConfig(ws_miner="fancy"))


def test_term_grad_norms_hand_values():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    h = torch.nn.Parameter(torch.tensor([3.0]))
    x = torch.tensor([3.0, 4.0])
    terms = {"a": 2 * (p * x).sum(), "b": (h * h).sum() + p.sum(), "none": torch.zeros(())}
    g = term_grad_norms(terms, [p], [h])
    assert g["grad_a"] == pytest.approx(10.0) and g["grad_head_a"] == 0.0  # |2x| = 10
    assert g["grad_b"] == pytest.approx(math.sqrt(2)) and g["grad_head_b"] == pytest.approx(6.0)
    assert g["grad_none"] == 0.0
    (terms["a"] + terms["b"]).backward()  # the graph was retained for the step's backward
    assert torch.allclose(p.grad, 2 * x + 1)
