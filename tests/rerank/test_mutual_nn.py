"""The one mutual-NN module: every entry point agrees with a brute-force definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placerank.rerank.mutual_nn import (
    mnn_counts,
    mnn_counts_cpu,
    mnn_mean_similarity,
    mutual_nn_indices,
    mutual_nn_pairs,
    mutual_pairs_array,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(q: np.ndarray, c: np.ndarray, threshold=None) -> set[tuple[int, int]]:
    s = q.astype(np.float64) @ c.astype(np.float64).T
    out: set[tuple[int, int]] = set()
    if s.size == 0:
        return out
    for i in range(len(q)):
        j = int(s[i].argmax())
        if int(s[:, j].argmax()) == i and (threshold is None or s[i, j] > threshold):
            out.add((i, j))
    return out


def test_every_entry_point_gives_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    q = _unit(rng, 40)
    cands = []
    for k, n in enumerate((40, 25, 60, 1, 0)):
        c = _unit(rng, n)
        m = min(n, 8 * k)
        c[:m] = q[:m] + 0.1 * _unit(rng, m)
        cands.append(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12))
    for th in (None, 0.3):
        expected = [_brute(q, c, th) for c in cands]
        counts = [len(e) for e in expected]
        assert mnn_counts(q, cands, threshold=th, chunk=2).tolist() == counts
        assert mnn_counts_cpu(q, cands, th).tolist() == counts
        for c, e in zip(cands, expected):
            assert {tuple(p) for p in mutual_pairs_array(q, c, th).tolist()} == e
            i, j = mutual_nn_indices(torch.from_numpy(q) @ torch.from_numpy(c).t(), th) if len(c) else ([], [])
            assert set(zip(map(int, i), map(int, j))) == e
            if th is None:
                assert {tuple(p) for p in mutual_nn_pairs(q, c).tolist()} == e


def test_pairs_with_exact_ties_keep_the_first_index_in_both_directions():
    """Integer descriptors make many exactly equal similarities: the CPU path (one product, no
    column-wise argmax, ties found from knocked-out column maxima) must still give argmax's
    first-index answer in both directions, as the brute-force definition does."""
    rng = np.random.default_rng(1)
    for _ in range(400):
        n, m, d = (int(x) for x in (*rng.integers(1, 30, 2), rng.integers(1, 4)))
        q = rng.integers(-2, 3, (n, d)).astype(np.float32)
        c = rng.integers(-2, 3, (m, d)).astype(np.float32)
        got = mutual_nn_pairs(q, c)
        assert got[:, 0].tolist() == sorted(got[:, 0].tolist())
        assert {tuple(p) for p in got.tolist()} == _brute(q, c)


def test_mean_similarity_value_and_gradient_equal_the_full_matrix_definition():
    torch.manual_seed(0)
    f1 = torch.nn.functional.normalize(torch.randn(300, 16), dim=1).requires_grad_(True)
    g1 = torch.nn.functional.normalize(torch.randn(250, 16), dim=1).requires_grad_(True)
    f2 = f1.detach().clone().requires_grad_(True)
    g2 = g1.detach().clone().requires_grad_(True)
    for threshold in (None, 0.3):
        a = mnn_mean_similarity(f1, g1, threshold)
        sim = f2 @ g2.t()  # the definition: gradient through the full similarity matrix
        i, j = mutual_nn_indices(sim, threshold)
        b = sim[i, j].mean()
        assert i.numel() > 1 and a.item() == pytest.approx(b.item(), abs=1e-6)
        f1.grad = g1.grad = f2.grad = g2.grad = None
        a.backward()
        b.backward()
        assert torch.allclose(f1.grad, f2.grad, atol=1e-7) and torch.allclose(g1.grad, g2.grad, atol=1e-7)
        assert f1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Parity with the official SelaVPR / FoL ``match_batch_tensor`` semantics (spec selavpr.md §3.2,
# §5.2; fol.md §3.4, §5), against an independent reference written from the specs:
#   - mutual pairs: query column i, a(i) = best candidate row, b(a(i)) == i;
#   - exactly one mutual pair before the threshold: score 0, training falls back to the mean of
#     position-aligned dot products (the official index tensor is 0-d);
#   - otherwise: score = number of pairs with cosine > threshold; training similarity = their
#     mean cosine, NaN when none survives.
# ---------------------------------------------------------------------------------------------


def _official(q: np.ndarray, c: np.ndarray, threshold=None) -> tuple[int, float]:
    """(re-rank score, training similarity) of query set q against candidate set c."""
    q, c = q.astype(np.float64), c.astype(np.float64)
    pairs = []
    for i in range(len(q)):
        a = max(range(len(c)), key=lambda j: (c[j] @ q[i], -j))  # first maximum, as argmax
        b = max(range(len(q)), key=lambda k: (c[a] @ q[k], -k))
        if b == i:
            pairs.append((i, a))
    if len(pairs) == 1:
        n = min(len(q), len(c))
        return 0, float(np.mean([q[k] @ c[k] for k in range(n)]))
    kept = [(i, j) for i, j in pairs if threshold is None or q[i] @ c[j] > threshold]
    sim = float(np.mean([q[i] @ c[j] for i, j in kept])) if kept else float("nan")
    return len(kept), sim


# Three hand-built unit vectors against the identity: S = G^T, every pair mutual, cosines .8/.6/1.
HAND_Q = torch.eye(3)
HAND_G = torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.6, -0.8], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    "threshold,count,sim",
    [(None, 3, (0.8 + 0.6 + 1.0) / 3), (0.7, 2, 0.9), (0.9, 1, 1.0), (1.0, 0, float("nan"))],
)
def test_hand_built_two_one_and_zero_surviving_pairs(threshold, count, sim):
    assert _official(HAND_Q.numpy(), HAND_G.numpy(), threshold) == (count, pytest.approx(sim, nan_ok=True))
    assert mnn_counts(HAND_Q, [HAND_G], threshold).tolist() == [count]  # one surviving pair counts 1
    assert mnn_counts_cpu(HAND_Q.numpy(), [HAND_G.numpy()], threshold).tolist() == [count]
    f = HAND_Q.clone().requires_grad_(True)
    s = mnn_mean_similarity(f, HAND_G, threshold)
    if count == 0:  # official: mean of an empty set; a constant, so dropping it leaks nothing
        assert torch.isnan(s) and not s.requires_grad
        return
    assert s.item() == pytest.approx(sim, abs=1e-6)
    s.backward()
    kept = [k for k, cos in enumerate((0.8, 0.6, 1.0)) if threshold is None or cos > threshold]
    expected = torch.zeros(3, 3)
    expected[kept] = HAND_G[kept] / len(kept)  # d mean / d f_i = g_i / |kept| for the kept pairs only
    assert torch.allclose(f.grad, expected, atol=1e-7)


def test_single_mutual_pair_before_the_threshold_is_the_official_quirk():
    # q1 and q0 both prefer g0, which prefers q0: one mutual pair only (0, 0), cosine .8.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])
    assert _official(q.numpy(), g.numpy(), 0.7) == (0, pytest.approx(0.4))
    # training: position-aligned fallback (.8 + 0) / 2, with a gradient, as the official code
    assert mnn_mean_similarity(q, g, 0.7).item() == pytest.approx(0.4, abs=1e-6)
    assert mnn_mean_similarity(q, g).item() == pytest.approx(0.4, abs=1e-6)
    # re-ranking: SelaVPR (no threshold) scores it 0 with min_matches=2 (= single_pair_zero);
    # FoL scores it 0 with single_pair_zero (the fol-vit* default) and 1 without (the CNN's)
    assert mnn_counts(q, [g], min_matches=2).tolist() == [0]
    assert mnn_counts(q, [g], single_pair_zero=True).tolist() == [0]
    assert mnn_counts(q, [g], 0.7).tolist() == [1]
    assert mnn_counts(q, [g], 0.7, single_pair_zero=True).tolist() == [0]


# (query set, candidate set, pairs before 0.7, official FoL score at 0.7), built by hand. Every pair
# below is checked in the comments: a(i) = best candidate of query i, b(j) = best query of candidate j.
E2 = torch.eye(2)
Q3 = torch.eye(3)[:2]  # two query vectors in 3-d
SINGLE_PAIR_CASES = {
    # no pair at all: an empty candidate (non-empty sets always have one: the largest entry)
    "0 pairs (empty)": (E2, torch.zeros(0, 2), 0, 0),
    # a(0) = g0 (.8 vs -1), b(g0) = q0 (.8 vs .6): (0, 0); a(1) = g0 (.6 vs 0) but b(g0) = q0:
    # one pair, cosine .8 > .7, alone before the threshold: official 0
    "1 pair, above 0.7": (E2, torch.tensor([[0.8, 0.6], [-1.0, 0.0]]), 1, 0),
    # a(0) = g0 (.6 vs -.3), b(g0) = q0 (.6 vs .5): (0, 0) at .6; a(1) = g0 (.5 vs -.1), not mutual
    "1 pair, below 0.7": (Q3, torch.tensor([[0.6, 0.5, 0.6245], [-0.3, -0.1, 0.9487]]), 1, 0),
    # a(0) = g0 (.8), b(g0) = q0; a(1) = g1 (.6), b(g1) = q1: (0, 0) .8 survives, (1, 1) .6 does not
    "2 pairs, 1 survives": (Q3, torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.6, 0.8]]), 2, 1),
    # the same with (1, 1) at .8: both survive
    "2 pairs, 2 survive": (Q3, torch.tensor([[0.8, 0.0, 0.6], [0.0, 0.8, 0.6]]), 2, 2),
    # HAND at threshold 1.0: three pairs, none survives
    "3 pairs, 0 survive": (HAND_Q, HAND_G, 3, 0),
}


@pytest.mark.parametrize("case", list(SINGLE_PAIR_CASES))
def test_official_fol_score_with_zero_one_and_two_pairs_before_the_threshold(case):
    q, g, pairs, official = SINGLE_PAIR_CASES[case]
    threshold = 1.0 if case.startswith("3 pairs") else 0.7
    assert len(_brute(q.numpy(), g.numpy())) == pairs  # the pairs before the threshold
    if len(g):
        assert _official(q.numpy(), g.numpy(), threshold)[0] == official  # the independent reference
    got = mnn_counts(q, [g], threshold, single_pair_zero=True).tolist()
    got_cpu = mnn_counts_cpu(q.numpy(), [g.numpy()], threshold, single_pair_zero=True).tolist()
    assert got == got_cpu == [official]
    # without the rule only the lone pair above 0.7 differs (it counts 1)
    loose = mnn_counts_cpu(q.numpy(), [g.numpy()], threshold).tolist()
    assert loose == [1 if case == "1 pair, above 0.7" else official]
    # in one batch with the others (zero-padded per chunk, -inf masked): the same scores
    same_q = [(c[1], c[3]) for c in SINGLE_PAIR_CASES.values() if c[0] is q]
    others = [c for c, _ in same_q]
    batch = mnn_counts(q, others, threshold, chunk=8, single_pair_zero=True).tolist()
    assert batch == [s for _, s in same_q]
    assert batch == mnn_counts_cpu(q.numpy(), [o.numpy() for o in others], threshold, single_pair_zero=True).tolist()


def test_random_sets_match_the_reference_and_padding_changes_nothing():
    rng = np.random.default_rng(3)
    for trial in range(12):
        q = _unit(rng, int(rng.integers(4, 30)), 8)
        c = _unit(rng, int(rng.integers(4, 30)), 8)
        m = min(len(q), len(c), 6)
        c[:m] = q[:m] + 0.3 * _unit(rng, m, 8)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        for th in (None, 0.7):
            count, sim = _official(q, c, th)
            assert mnn_counts_cpu(q, [c], th, single_pair_zero=True).tolist() == [count], (trial, th)
            assert mnn_counts(q, [c], th, single_pair_zero=True).tolist() == [count], (trial, th)
            got = mnn_counts_cpu(q, [c], th).tolist()[0]
            assert got == count or (count == 0 and got == 1), (trial, th)
            s = mnn_mean_similarity(torch.from_numpy(q), torch.from_numpy(c), th).item()
            assert s == pytest.approx(sim, abs=1e-5, nan_ok=True)
        # the official code zero-pads both sets to a fixed length (3600): with the 0.7 threshold
        # the padded rows never pass and never take a surviving pair, so counts and sims agree
        qp = np.concatenate([q, np.zeros((5, 8), np.float32)])
        cp = np.concatenate([c, np.zeros((9, 8), np.float32)])
        count, sim = _official(qp, cp, 0.7)
        assert mnn_counts(q, [c], 0.7).tolist() == mnn_counts(qp, [cp], 0.7).tolist() == [count]
        s = mnn_mean_similarity(torch.from_numpy(q), torch.from_numpy(c), 0.7).item()
        assert s == pytest.approx(sim, abs=1e-5, nan_ok=True)


def test_empty_sets_score_zero_and_give_nan_similarity():
    q = torch.eye(3)
    empty = torch.zeros(0, 3)
    assert mnn_counts(q, [empty, HAND_G, empty], 0.7).tolist() == [0, 2, 0]
    assert mnn_counts_cpu(q.numpy(), [empty.numpy(), HAND_G.numpy()], 0.7).tolist() == [0, 2]
    assert mnn_counts(empty, [HAND_G], 0.7).tolist() == [0]
    assert mnn_counts_cpu(empty.numpy(), [HAND_G.numpy()], 0.7).tolist() == [0]
    assert mnn_counts(q, [], 0.7).tolist() == []
    assert torch.isnan(mnn_mean_similarity(q, empty, 0.7)) and torch.isnan(mnn_mean_similarity(empty, q))
