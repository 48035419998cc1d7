"""FoL losses with hand-checked values (spec fol.md §3)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from placerank.train.losses.fol import (
    FoLCriterion,
    FoLLossConfig,
    MultiSimilarity,
    batch_hard_triplets,
    cel_loss,
    dense_cell_descriptors,
    local_triplet_loss,
    mine_pseudo_correspondences,
    next_partner,
    patch_to_local_cell,
    pseudo_correspondence_loss,
    random_partner,
    sal_terms,
)


def test_multi_similarity_hand_value():
    # S01=.8 S02=.6 S03=0 S12=.96 S13=.6 S23=.8; labels 0,0,1,1.
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss, mined = MultiSimilarity()(e, labels)
    # miner (eps .1): anchors 0 and 3 keep nothing; anchor 1 keeps pos 0 (.8) and neg 2 (.96), anchor 2
    # symmetric. Per anchor: log(1 + e^-0.8) + log(1 + e^(50*.96)) / 50; mean over 4 anchors.
    per = math.log(1 + math.exp(-0.8)) + math.log1p(math.exp(48.0)) / 50
    assert loss.item() == pytest.approx(2 * per / 4, abs=1e-5)
    assert loss.item() == pytest.approx(0.665550, abs=1e-5)
    assert mined == pytest.approx(0.5)  # only anchors 1 and 2 keep mined pairs


def test_sal_terms_hand_values_and_stop_gradients():
    me = torch.tensor([[0.5, 0.5]], requires_grad=True)
    ma = torch.tensor([[0.25, 0.75]], requires_grad=True)
    kl1, kl2 = sal_terms(me, ma)
    assert kl1.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)  # 0.143841
    assert kl2.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)  # 0.130812
    kl1.backward()
    assert me.grad is None  # Mᵉ detached in KL₁
    assert torch.allclose(ma.grad, torch.tensor([[-2.0, -2.0 / 3.0]]))  # d/dMa of -Me log Ma
    ma.grad = None
    kl2.backward()
    assert ma.grad is None  # Mᵃ detached in KL₂
    assert torch.allclose(me.grad, torch.tensor([[-0.5, -1.5]]))


def test_cel_hand_value_and_gradient_only_into_weights():
    # grid 1x2 and local map 1x2: the align_corners upsampling is the identity.
    R = torch.tensor([[0.75, 0.25], [0.5, 0.5]], requires_grad=True)
    L = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]] * 2).permute(0, 2, 1).reshape(2, 2, 1, 2).clone().requires_grad_(True)
    loss = cel_loss(R, (1, 2), L, partners=[1, 0])
    # fg0 ~ (.75,.25), bg0 ~ (.25,.75), fg1 = bg1 ~ (1,1): cos = 0.894427 for both
    c = (0.75 + 0.25) / (math.hypot(0.75, 0.25) * math.sqrt(2))
    assert loss.item() == pytest.approx(0.7 * (1 - c) + 0.3 * (1 - c), abs=1e-6)  # 0.105573
    loss.backward()
    assert L.grad is None and R.grad is not None and R.grad.abs().sum() > 0


def test_local_triplet_loss_hand_value_sum_and_quirk():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])  # one mutual pair only -> position-aligned fallback (.8+0)/2
    n = torch.tensor([[0.8, 0.6], [0.6, 0.8]])  # two mutual pairs with cos .8 -> mean .8
    sets = [a, p, n]
    one = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    assert local_triplet_loss(sets, one, threshold=0.7).item() == pytest.approx(0.8 - 0.4, abs=1e-6)
    two = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 2]))
    assert local_triplet_loss(sets, two, threshold=0.7).item() == pytest.approx(0.8, abs=1e-6)  # summed
    assert local_triplet_loss(sets, two, threshold=0.7, reduction="mean").item() == pytest.approx(0.4, abs=1e-6)
    # cosine must be strictly > threshold: at 0.8 no negative pair survives -> the official
    # similarity is NaN and the triplet contributes nothing (no NaN in the loss)
    assert local_triplet_loss(sets, one, threshold=0.8).item() == 0.0
    assert local_triplet_loss(sets, one, threshold=0.85).item() == 0.0


def test_local_triplet_loss_zero_one_two_surviving_pairs_and_no_nan_gradients():
    eye = torch.eye(3)
    g = torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.6, -0.8], [0.0, 0.0, 1.0]])  # mutual cosines .8, .6, 1
    one = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    # anchor = I, positive = I (3 pairs, cos 1), negative = g: at 0.7 two pairs survive (mean .9),
    # at 0.9 one survives (its cosine 1.0), at 1.0 none (NaN: dropped)
    for threshold, expected in ((0.7, 0.0), (0.9, 0.0), (1.0, 0.0)):
        assert local_triplet_loss([eye, eye, g], one, threshold).item() == pytest.approx(expected, abs=1e-6)
    # swap: positive = g, negative = I: max(0, 1 - sim(a, p)); sim 0.9 (two), 1.0 (one), NaN (none)
    for threshold, expected in ((0.7, 0.1), (0.9, 0.0), (1.0, 0.0)):
        assert local_triplet_loss([eye, g, eye], one, threshold).item() == pytest.approx(expected, abs=1e-6)
    # a triplet with a NaN similarity next to a normal one: only the normal one counts; gradients finite
    a = eye.clone().requires_grad_(True)
    two = (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([2, 3]))
    loss = local_triplet_loss([a, g, eye, torch.zeros(0, 3)], two, 0.7)  # the empty set: no pair at all
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    loss.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    none = local_triplet_loss([a, g, torch.zeros(0, 3)], one, 0.7)  # nothing counts: 0 with a graph
    assert none.item() == 0.0 and none.requires_grad


def test_batch_hard_triplets_pick_hardest():
    d = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.6]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    a, p, n = batch_hard_triplets(d, labels)
    got = {int(x): (int(y), int(z)) for x, y, z in zip(a, p, n)}
    assert got[0] == (1, 3) and got[2] == (3, 1)


def test_partners_follow_labels_not_positions():
    labels = [0, 0, 0, 1, 1, 2]
    assert next_partner(labels) == [1, 2, 0, 4, 3, -1]
    rp = random_partner(labels, random.Random(0))
    assert rp[5] == -1 and rp[3] == 4 and rp[4] == 3 and all(rp[i] in (0, 1, 2) and rp[i] != i for i in range(3))


def test_patch_to_local_cell_matches_official_322_grid():
    r = torch.arange(23)
    row, col = patch_to_local_cell(r, r, (23, 23), (89, 89))
    official = [round((14 * k + 7) * 89 / 322) for k in range(23)]
    assert row.tolist() == official and col.tolist() == official
    # another grid (ViT at 504: 36 -> 141) stays inside the map and is monotone
    row36, _ = patch_to_local_cell(torch.arange(36), torch.arange(36), (36, 36), (141, 141))
    assert row36.min() >= 0 and row36.max() <= 140 and (row36.diff() > 0).all()


def _mining_case():
    fi = torch.zeros(3, 4)
    fi[:, 0] = torch.tensor([0.0, 1.0, 0.0])
    fi[:, 1] = torch.tensor([1.0, 0.0, 0.0])
    fi[:, 3] = torch.tensor([0.0, 0.0, 1.0])
    fj = torch.zeros(3, 4)
    fj[:, 0] = F.normalize(torch.tensor([0.9, 0.43589, 0.0]), dim=0)
    fj[:, 1] = torch.tensor([0.0, 0.5, 0.8660254])
    fj[:, 2] = F.normalize(torch.tensor([0.3, 0.95394, 0.0]), dim=0)
    fj[:, 3] = torch.tensor([0.6, 0.0, 0.8])
    pi = torch.tensor([[0.7, 0.6, 0.0, 0.0], [0.0, 0.1, 0.0, 0.5]])
    pj = torch.tensor([[0.3, 0.0, 0.2, 0.05], [0.0, 0.3, 0.3, 0.3]])
    ai = torch.tensor([0.5, 0.5, 0.05, 0.5])
    return fi, fj, pi, pj, ai


def test_pseudo_correspondence_mining_hand_case():
    fi, fj, pi, pj, ai = _mining_case()
    cfg = FoLLossConfig()
    # anchors {0,1,3}, first dropped. Anchor 1 -> cluster 0 -> candidates {0,2}: cos .9 / .3, ratio 3 -> accept.
    # Anchor 3 -> cluster 1 -> candidates {1,2,3}: .866 / .8, ratio 1.08 -> reject.
    pairs = mine_pseudo_correspondences(fi, fj, pi, pj, ai, cfg)
    assert [(a, b) for a, b, _ in pairs] == [(1, 0)]
    assert pairs[0][2] == pytest.approx(0.9, abs=1e-4)
    keep_first = FoLLossConfig(ws_drop_first_anchor=False)
    pairs = mine_pseudo_correspondences(fi, fj, pi, pj, ai, keep_first)
    assert [(a, b) for a, b, _ in pairs] == [(0, 2), (1, 0)]  # anchor 0: .954 / .436 passes
    assert [
        (a, b)
        for a, b, _ in mine_pseudo_correspondences(
            fi, fj, pi, pj, ai, FoLLossConfig(ws_drop_first_anchor=False, ws_max_per_image=1)
        )
    ] == [(0, 2)]
    assert mine_pseudo_correspondences(fi, fj, pi, pj, ai, FoLLossConfig(ws_min_cos=0.95)) == []


def test_pseudo_correspondence_loss_hand_value():
    fi, fj, pi, pj, ai = _mining_case()
    feats = torch.stack([fi, fj])  # grid 2x2
    plan = torch.stack([pi, pj])
    attn = torch.stack([ai, torch.zeros(4)])  # image 1 has no anchors
    L = torch.zeros(2, 2, 5, 5)
    L[0, 0] = 1.0  # image 0: every cell (1, 0)
    L[1, 0], L[1, 1] = 0.6, 0.8  # image 1: every cell (.6, .8)
    L.requires_grad_(True)
    cells = dense_cell_descriptors(L)
    loss, n = pseudo_correspondence_loss(
        feats, plan, attn, cells, (2, 2), (5, 5), next_partner([0, 0]), FoLLossConfig()
    )
    assert n == 1
    assert loss.item() == pytest.approx(0.9 * (1 - 0.6) * 0.01, abs=1e-6)  # s1 (1 - cos) 0.01
    loss.backward()
    assert L.grad.abs().sum() > 0
    none, n0 = pseudo_correspondence_loss(
        feats, plan, torch.zeros(2, 4), cells, (2, 2), (5, 5), [1, 0], FoLLossConfig()
    )
    assert n0 == 0 and none.item() == 0.0


def test_total_loss_uses_configured_weights(gardens):
    from placerank.data.images import load_tensor
    from placerank.models.fol_factories import build_fol_cnn

    torch.manual_seed(0)
    model = build_fol_cnn(pretrained=True, image_size=(128, 224)).train()
    paths = [gardens / t / f"Image{k:03d}.jpg" for k in (10, 60) for t in ("day_left", "day_right")]
    images = torch.stack([load_tensor(p, model.preprocess)[0] for p in paths])
    labels = torch.tensor([0, 0, 1, 1])
    out = model.run(images, local_map=True)
    sets = [s.descriptors for s in model.region_sets(out, training=True)]
    Ln = F.normalize(out.local_map, dim=1)
    _, log = FoLCriterion(FoLLossConfig())(out, sets, labels, Ln)
    w = dict(w_ms=2.0, w_local=0.5, w_sal=0.1, w_cel=3.0, w_ws=0.0)
    total, log2 = FoLCriterion(FoLLossConfig(**w))(out, sets, labels, Ln)
    expect = 2.0 * log["ms"] + 0.5 * log["local"] + 0.1 * (log["kl1"] + log["kl2"]) + 3.0 * log["cel"]
    assert total.item() == pytest.approx(expect, rel=1e-5)
    default_total = log["ms"] + log["local"] + 0.005 * (log["kl1"] + log["kl2"]) + log["cel"] + log["ws"]
    assert log["loss"] == pytest.approx(default_total, rel=1e-5)
    assert log["triplets"] == 4 and log["ms"] > 0 and log["cel"] > 0
    total.backward()
    assert model.upconv.weight.grad is not None and model.aggregator.score[0].weight.grad is not None
    assert model.aggregator.dustbin_head.weight.grad is not None
