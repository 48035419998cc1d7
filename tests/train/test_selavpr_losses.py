"""SelaVPR losses (spec §3) on hand-computed 2-D examples."""

from __future__ import annotations

import math

import pytest
import torch

from placerank.train.losses.selavpr import (
    SelaVPRLossConfig,
    global_triplet_loss,
    local_mnn_loss,
    mnn_mean_similarity,
    selavpr_loss,
)

# F, G: S = F G^T = [[0.8, 0, -1], [0.6, 1, 0], [0.96, 0.8, -0.6]].
# Row argmax: f0->g0, f1->g1, f2->g0; column argmax: g0->f2, g1->f1, g2->f1.
# Mutual pairs: (1,1) sim 1.0 and (2,0) sim 0.96 -> mean 0.98.
F_SET = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
G_SET = torch.tensor([[0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])


pytestmark = pytest.mark.usefixtures("single_thread")


def test_mnn_mean_similarity_hand_checked():
    assert mnn_mean_similarity(F_SET, G_SET).item() == pytest.approx(0.98, abs=1e-6)
    # F against itself: every point is its own mutual NN -> mean 1.
    assert mnn_mean_similarity(F_SET, F_SET).item() == pytest.approx(1.0, abs=1e-6)
    # F against -F: mutual pairs (0,1) and (1,0), both similarity 0.
    assert mnn_mean_similarity(F_SET, -F_SET).item() == pytest.approx(0.0, abs=1e-6)


def test_mnn_single_pair_falls_back_to_same_index_mean():
    # One candidate feature: only the global maximum is mutual (|M| = 1), so the official
    # fallback (mean f_k . g_k over the common index range = f0 . g0 = 0) applies, not 1.0.
    f = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    g = torch.tensor([[1.0, 0.0]])
    assert mnn_mean_similarity(f, g).item() == pytest.approx(0.0, abs=1e-7)


def test_global_triplet_loss_hand_checked():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])  # ||q - p|| = sqrt(0.8) = 0.894427
    n = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # distances sqrt(2) and 0
    # hinge: max(0, 0.894427 - 1.414214 + 0.1) = 0 ; max(0, 0.894427 - 0 + 0.1) = 0.994427
    expected = (0.0 + (math.sqrt(0.8) + 0.1)) / 2
    assert global_triplet_loss(q, p, n, margin=0.1).item() == pytest.approx(expected, abs=1e-5)


def test_local_loss_hand_checked():
    # Q=F, P=G (sim 0.98); negatives F (sim 1.0) and -F (sim 0.0):
    # (max(0, 1.0 - 0.98) + max(0, 0.0 - 0.98)) / 2 = 0.01
    q, p = F_SET[None], G_SET[None]
    n = torch.stack([F_SET, -F_SET])[None]
    assert local_mnn_loss(q, p, n).item() == pytest.approx(0.01, abs=1e-6)


def test_selavpr_loss_layout_and_total():
    # One tuple (q, p, n1, n2): global vectors as in the triplet test, dense sets as in the
    # local test laid out (C=2, h=1, w=3).
    glob = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    sets = torch.stack([F_SET, G_SET, F_SET, -F_SET])  # (4, 3, 2)
    dense = sets.transpose(1, 2).reshape(4, 2, 1, 3)
    total, parts = selavpr_loss(glob, dense, num_negatives=2)
    lg = (math.sqrt(0.8) + 0.1) / 2
    assert parts["global"] == pytest.approx(lg, abs=1e-5)
    assert parts["local"] == pytest.approx(0.01, abs=1e-6)
    assert total.item() == pytest.approx(lg + 0.01, abs=1e-5)
    _, parts2 = selavpr_loss(glob, dense, 2, SelaVPRLossConfig(local_weight=0.0))
    assert parts2["loss"] == pytest.approx(lg, abs=1e-5)
    with pytest.raises(ValueError, match="not a whole number of 4-image tuples"):
        selavpr_loss(glob[:3], dense[:3], num_negatives=2)
