"""SFRS losses and labels: hand-checked values (placerank/train/losses/sfrs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from placerank.train.losses.sfrs import (
    REGION_NAMES,
    hardest_region_negatives,
    image_to_region_similarities,
    k_reciprocal_rerank,
    k_reciprocal_rerank_all,
    k_reciprocal_sets,
    quarter_masks,
    regions_from_quarters,
    sare_ind_loss,
    select_difficult_positives,
    soft_region_loss,
    teacher_temperature,
)


def test_sare_ind_dot_hand_checked():
    a = torch.tensor([1.0, 0.0])
    p = torch.tensor([0.8, 0.6])  # <a,p> = 0.8
    n = torch.tensor(
        [
            [0.0, 1.0],  # <a,n1> = 0
            [0.6, 0.8],
        ]
    )  # <a,n2> = 0.6
    tau = 0.1
    # -log(e^{.8/.1} / (e^{.8/.1} + e^{s_n/.1})) = log(1 + e^{(s_n - .8)/.1})
    expected = (math.log(1 + math.exp(-8.0)) + math.log(1 + math.exp(-2.0))) / 2
    assert expected == pytest.approx(0.0636316, abs=1e-6)
    assert sare_ind_loss(a, p, n, tau).item() == pytest.approx(expected, rel=1e-6)
    # batched form (B=2 identical tuples) gives the same mean
    got = sare_ind_loss(a.repeat(2, 1), p.repeat(2, 1), n.repeat(2, 1, 1), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sare_ind_euclidean_hand_checked():
    a = torch.tensor([1.0, 0.0])
    p = torch.tensor([0.8, 0.6])  # |a-p|^2 = 0.04 + 0.36 = 0.4
    n = torch.tensor([[0.0, 1.0]])  # |a-n|^2 = 2
    # logits -d^2 (tau = 1): log(1 + e^{-2 + 0.4})
    assert sare_ind_loss(a, p, n, 1.0, "euclidean").item() == pytest.approx(math.log(1 + math.exp(-1.6)), rel=1e-6)
    with pytest.raises(ValueError, match="similarity must be 'dot' or 'euclidean'"):
        sare_ind_loss(a, p, n, 1.0, "cosine")


def test_regions_from_unnormalised_quarters_hand_checked():
    # K = 1 cluster, D = 2: quarter VLADs TL=(3,0), TR=(0,4), BL=(1,0), BR=(0,0)
    q = torch.tensor([[[[3.0, 0.0]], [[0.0, 4.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])  # (1, 4, 1, 2)
    r = regions_from_quarters(q)
    assert r.shape == (1, 9, 2)
    assert REGION_NAMES == (
        "global",
        "top",
        "bottom",
        "left",
        "right",
        "top_left",
        "top_right",
        "bottom_left",
        "bottom_right",
    )
    expected = {
        "global": (4 / math.sqrt(32), 4 / math.sqrt(32)),  # sum (4, 4), normalised after summing
        "top": (0.6, 0.8),  # (3, 4) / 5
        "bottom": (1.0, 0.0),  # (1, 0)
        "left": (1.0, 0.0),  # (4, 0)
        "right": (0.0, 1.0),  # (0, 4)
        "top_left": (1.0, 0.0),
        "top_right": (0.0, 1.0),
        "bottom_left": (1.0, 0.0),
        "bottom_right": (0.0, 0.0),  # an empty quarter stays zero
    }
    for i, name in enumerate(REGION_NAMES):
        assert r[0, i].tolist() == pytest.approx(expected[name], abs=1e-6), name
    # normalising the quarters first would give a different "top" (1,1)/sqrt2: the order matters
    assert r[0, 1].tolist() != pytest.approx([2**-0.5, 2**-0.5], abs=1e-3)


def test_regions_intra_then_global_normalisation():
    # K = 2 clusters: intra-L2 per cluster, cluster-major flatten, then L2 over all
    q = torch.zeros(1, 4, 2, 2)
    q[0, 0, 0] = torch.tensor([3.0, 4.0])  # cluster 0 in TL
    q[0, 3, 1] = torch.tensor([0.0, 10.0])  # cluster 1 in BR
    g = regions_from_quarters(q)[0, 0]
    s = 1 / math.sqrt(2)
    assert g.tolist() == pytest.approx([0.6 * s, 0.8 * s, 0.0, 1.0 * s], abs=1e-6)


def test_quarter_masks_need_even_map():
    m = quarter_masks(4, 6)
    assert m.sum(dim=(1, 2)).tolist() == [6, 6, 6, 6] and m.sum(0).eq(1).all()
    assert m[0, :2, :3].eq(1).all() and m[3, 2:, 3:].eq(1).all()
    with pytest.raises(ValueError, match="SFRS region descriptors need an even feature map, got 5x6"):
        quarter_masks(5, 6)


def test_hardest_region_negative_and_image_to_region_similarity():
    anchor = torch.tensor([1.0, 0.0])
    regions = torch.zeros(2, 9, 2)
    regions[:, :, 1] = 1.0  # every region orthogonal to the anchor ...
    regions[0, 4] = torch.tensor([0.6, 0.8])  # ... except neg 0's "right" half
    regions[1, 8] = torch.tensor([0.8, 0.6])  # and neg 1's bottom-right quarter
    regions.requires_grad_(True)
    sims = image_to_region_similarities(anchor, regions)
    assert sims.shape == (2, 9)
    assert sims[0, 4].item() == pytest.approx(0.6) and sims[1, 8].item() == pytest.approx(0.8)
    chosen = hardest_region_negatives(anchor, regions)
    assert chosen.tolist() == [pytest.approx([0.6, 0.8]), pytest.approx([0.8, 0.6])]
    chosen.sum().backward()  # gradient only reaches the chosen regions
    nz = regions.grad.abs().sum(-1).nonzero().tolist()
    assert nz == [[0, 4], [1, 8]]


def test_soft_loss_is_one_joint_softmax_hand_checked():
    rng = np.random.default_rng(0)
    s_s = rng.uniform(-0.2, 0.9, (2, 9))
    s_t = rng.uniform(-0.2, 0.9, (2, 9))
    tau_s, tau_t = 0.07, 0.05
    # by hand: one distribution over all 18 (positive, region) logits
    zt = s_t.ravel() / tau_t
    pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
    zs = s_s.ravel() / tau_s
    log_ps = zs - (zs.max() + np.log(np.exp(zs - zs.max()).sum()))
    expected = -(pt * log_ps).sum()
    got = soft_region_loss(torch.tensor(s_s), torch.tensor(s_t), tau_s, tau_t).item()
    assert got == pytest.approx(expected, rel=1e-9)
    # a per-positive softmax (the wrong reading) gives another value
    per_row = -(F.softmax(torch.tensor(s_t) / tau_t, -1) * F.log_softmax(torch.tensor(s_s) / tau_s, -1)).sum(-1).mean()
    assert abs(per_row.item() - got) > 1e-3
    # equal logits and temperatures: the loss is the entropy of the target; its minimum over s_S
    same = soft_region_loss(torch.tensor(s_t), torch.tensor(s_t), tau_t, tau_t).item()
    assert same == pytest.approx(-(pt * np.log(pt)).sum(), rel=1e-9)
    # the teacher gets no gradient
    t = torch.tensor(s_t, requires_grad=True)
    s = torch.tensor(s_s, requires_grad=True)
    soft_region_loss(s, t, tau_s, tau_t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_teacher_temperatures_per_generation():
    assert [teacher_temperature(g) for g in range(6)] == [0.07, 0.07, 0.06, 0.05, 0.05, 0.05]
    assert teacher_temperature(2, (0.1, 0.2, 0.3)) == 0.3


def _reference_joint(raw_dist, rows, k1, k2, lam):
    """Zhong et al.'s re-ranking over one set of items, written out element by element with
    Python sets (an independent second implementation to check the vectorised one)."""
    raw = np.asarray(raw_dist, dtype=np.float64) ** 2
    n = raw.shape[0]
    # each column divided by its maximum, then transposed
    d = np.array([[raw[j, i] / max(raw[k, i] for k in range(n)) for j in range(n)] for i in range(n)])
    rank = [sorted(range(n), key=lambda j, i=i: (d[i, j], j)) for i in range(n)]

    def recip(i, k):
        fwd = rank[i][: k + 1]
        return {j for j in fwd if i in rank[j][: k + 1]}

    V = np.zeros((n, n))
    for i in range(n):
        R = recip(i, k1)
        exp = set(R)
        for c in R:
            Rc = recip(c, int(round(k1 / 2)))
            if len(Rc & R) > 2 / 3 * len(Rc):
                exp |= Rc
        idx = sorted(exp)
        w = np.exp(-d[i, idx])
        V[i, idx] = w / w.sum()
    V = np.array([V[rank[i][:k2]].mean(axis=0) for i in range(n)])  # query expansion (k2 = 1: none)
    jac = np.zeros((len(rows), n))
    for r, i in enumerate(rows):
        for j in range(n):
            mn = np.minimum(V[i], V[j]).sum()
            mx = np.maximum(V[i], V[j]).sum()
            jac[r, j] = 1 - mn / mx
    return (1 - lam) * jac + lam * d[list(rows)]


def _reference_rerank(q_g, q_q, g_g, k1, k2, lam):
    """The query/gallery form: queries first in one set, query rows, gallery columns."""
    Q = q_g.shape[0]
    return _reference_joint(np.block([[q_q, q_g], [q_g.T, g_g]]), range(Q), k1, k2, lam)[:, Q:]


def _dists(x, y):
    return np.sqrt(np.maximum(((x[:, None] - y[None]) ** 2).sum(-1), 0))


def test_k_reciprocal_rerank_matches_reference_and_hand_case():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(5, 4))
    g = rng.normal(size=(40, 4))
    q_g, q_q, g_g = _dists(q, g), _dists(q, q), _dists(g, g)
    for k1 in (5, 20):
        got = k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=1, lambda_value=0.1)
        ref = _reference_rerank(q_g, q_q, g_g, k1, 1, 0.1)
        assert got.shape == (5, 40)
        np.testing.assert_allclose(got, ref, atol=1e-12)
    # lambda = 1: only the original distance remains, squared and divided by its row maximum
    only = k_reciprocal_rerank(q_g, q_q, g_g, k1=5, lambda_value=1.0)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    np.testing.assert_allclose(only, (full / full.max(axis=1, keepdims=True))[:5, 5:], rtol=1e-12)


def test_k_reciprocal_sets_hand_derived():
    # five images on a line at 0, 1, 3, 7, 8. k = 1 (top-2, itself included): 0 and 1 are each
    # other's nearest, 3 is nearest to 1 but 1 is not near 3 back, 7 and 8 pair up.
    x = np.array([0.0, 1.0, 3.0, 7.0, 8.0])
    top = np.argsort(np.abs(x[:, None] - x[None]), axis=1, kind="stable")
    as_sets = lambda k: [set(r.tolist()) for r in k_reciprocal_sets(top, k)]  # noqa: E731
    assert as_sets(1) == [{0, 1}, {0, 1}, {2}, {3, 4}, {3, 4}]
    # k = 2 (top-3, by position): 0: {0,1,3}, 1: {1,0,3}, 3: {3,1,0}, 7: {7,8,3}, 8: {8,7,3} ->
    # 0, 1, 3 are a clique; 3 is in 7's and 8's top-3 but neither is in 3's
    assert as_sets(2) == [{0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {3, 4}, {3, 4}]


def test_k_reciprocal_rerank_all_matches_reference_with_expansion():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 3))
    dist = _dists(x, x)
    rows = np.array([0, 7, 29])
    for k1, k2 in ((4, 1), (20, 1), (6, 3)):
        got = k_reciprocal_rerank_all(dist, rows, k1=k1, k2=k2, lambda_value=0.1)
        np.testing.assert_allclose(got, _reference_joint(dist, rows, k1, k2, 0.1), atol=1e-12)
        # every row is its own nearest item: d~ = 0 and Jaccard = 0 (V_i against itself)
        np.testing.assert_allclose(got[np.arange(3), rows], 0.0, atol=1e-12)


def test_official_mining_input_is_every_training_image_once():
    """Difficult positives in generation >= 1 (OpenIBL): the k-reciprocal sets are built over every
    training image, each present once, and read at the anchor; ``rerank_input=chunk`` (the former
    default) puts the chunk's anchors in front of every image, so each anchor is there twice."""
    from placerank.train.sfrs_data import SFRSData
    from placerank.train.sfrs_mining import SFRSMiner
    from placerank.train.sfrs_options import SFRSOptions

    rng = np.random.default_rng(7)
    places, trav = 8, 3  # image i: place i % 8 seen in traversal i // 8
    place_vec = rng.normal(size=(places, 6))
    feats = place_vec[np.arange(places * trav) % places] + 0.8 * rng.normal(size=(places * trav, 6))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    n = len(feats)
    lab = np.arange(n) % places
    same = (lab[:, None] - lab[None, :]) % places
    pos = (np.minimum(same, places - same) <= 1) & ~np.eye(n, dtype=bool)  # its place and the next ones
    data = SFRSData(
        paths=[],
        kind="place",
        labels=lab,
        sequence=np.arange(n) // places,
        positives=[np.flatnonzero(p) for p in pos],
        negative_ok=~pos & ~np.eye(n, dtype=bool),
        queries=np.arange(n),
    )
    chunk = np.array([0, 5, 13, 22])
    dist = np.maximum(2 - 2 * feats @ feats.T, 0)  # squared L2, as the miner computes it
    f = torch.from_numpy(feats)
    for mode, expected in (
        ("official", _reference_joint(dist, chunk, 4, 1, 0.1)),
        ("chunk", _reference_rerank(dist[chunk], dist[chunk][:, chunk], dist, 4, 1, 0.1)),
    ):
        opts = SFRSOptions(k1=4, pos_num=3, neg_num=2, neg_pool=4, rerank_input=mode)
        tuples = SFRSMiner(data, opts).mine(f, chunk, 1, np.random.default_rng(0))
        for r, (q, t) in enumerate(zip(chunk, tuples)):
            pool = data.positives[q][np.argsort(dist[q, data.positives[q]], kind="stable")]
            assert t["diffs"].tolist() == select_difficult_positives(pool, expected[r, pool], 3).tolist(), mode
    # the two inputs give different re-ranked distances on this set
    official = _reference_joint(dist, chunk, 4, 1, 0.1)
    assert not np.allclose(official, _reference_rerank(dist[chunk], dist[chunk][:, chunk], dist, 4, 1, 0.1))


def test_k_reciprocal_rerank_promotes_a_shared_neighbourhood():
    # images along a route (a line, 0.1 apart) and one stray image s off the route. The query
    # (at the route's start) is nearer to s than to the route image p at 0.6, but p shares the
    # query's reciprocal neighbours and s shares none: re-ranking puts p first.
    route = np.array([[0.05 * k, 0.0] for k in range(1, 21)])
    stray = np.array([[0.0, 0.32]])
    g = np.concatenate([route, stray])
    q = np.array([[0.0, 0.0]])
    q_g = _dists(q, g)
    p, s = 6, 20  # route point (0.35, 0) and the stray
    assert q_g[0, s] < q_g[0, p]
    final = k_reciprocal_rerank(q_g, _dists(q, q), _dists(g, g), k1=6, k2=1, lambda_value=0.1)
    assert final[0, p] < final[0, s]
    assert final[0, s] == pytest.approx(0.9 + 0.1 * 0.32**2 / 1.0**2)  # Jaccard 1: nothing shared


def test_difficult_positive_selection_hand_checked():
    pool = np.array([10, 11, 12, 13, 14])  # original (Euclidean) order: ranks 0..4
    # re-ranked distances -> new order 13, 10, 12, 14, 11: new ranks 10:1 11:4 12:2 13:0 14:3
    rd = np.array([0.2, 0.9, 0.3, 0.1, 0.5])
    # gaps: 10:+1 11:+2 12:0 13:-3 14:-1 -> improved 13 (-3), 14 (-1); unchanged 12; worse dropped
    assert select_difficult_positives(pool, rd, 10).tolist() == [13, 14, 12]
    assert select_difficult_positives(pool, rd, 2).tolist() == [13, 14]
    # generation 0 (no re-ranking): the nearest ones
    assert select_difficult_positives(pool, None, 3).tolist() == [10, 11, 12]
