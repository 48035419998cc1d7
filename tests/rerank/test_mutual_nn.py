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
