"""The balanced assignment (a transportation problem solved on the k clusters, never n x n) against the exact
replicated-column linear assignment, the balanced k-means built on it, and the partial eigensolver against a full
eigendecomposition. Small shapes only: speed is measured by scripts/bench_scaling.py, not here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from gguf_moeify.linalg import top_eigenvectors
from gguf_moeify.methods._balanced import balanced_assign, balanced_assign_with_prices, balanced_kmeans
from gguf_moeify.methods._spectral import coactivation_counts, spectral_embedding, top_marks


def _replicated_lsa(cost: np.ndarray) -> float:
    """The old exact solver: each cluster's column repeated m times, one seat per point."""
    n, k = cost.shape
    rows, cols = linear_sum_assignment(np.repeat(cost, n // k, axis=1))
    return float(cost[rows, cols // (n // k)].sum())


def _cases():
    rng = np.random.default_rng(7)
    for trial in range(120):
        k, m = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        kind = trial % 4
        if kind == 0:
            cost = rng.random((k * m, k))
        elif kind == 1:                       # many ties
            cost = rng.integers(0, 3, (k * m, k)).astype(float)
        elif kind == 2:                       # wide range, negative values
            cost = rng.standard_normal((k * m, k)) * 1e3
        else:                                 # one cluster every point wants
            cost = rng.random((k * m, k)) + np.r_[0.0, np.ones(k - 1)]
        yield cost


@pytest.mark.parametrize("cost", list(_cases()))
def test_assignment_is_balanced_and_optimal(cost):
    n, k = cost.shape
    labels = balanced_assign(cost)
    assert labels.shape == (n,) and np.array_equal(np.bincount(labels, minlength=k), np.full(k, n // k))
    total, exact = float(cost[np.arange(n), labels].sum()), _replicated_lsa(cost)
    # an exact method: the same optimum up to rounding (the brief allows 1%)
    assert total <= exact + 1e-9 * max(1.0, abs(exact))
    assert np.array_equal(labels, balanced_assign(cost))                 # deterministic


def test_assignment_on_larger_clustered_costs_matches_the_exact_cost():
    rng = np.random.default_rng(0)
    n, k = 768, 24
    pts = rng.standard_normal((n, 8))
    centres = pts[rng.choice(n, k, replace=False)]
    cost = ((pts[:, None, :] - centres[None]) ** 2).sum(-1)
    labels = balanced_assign(cost)
    assert np.array_equal(np.bincount(labels, minlength=k), np.full(k, n // k))
    assert float(cost[np.arange(n), labels].sum()) == pytest.approx(_replicated_lsa(cost), rel=1e-9)


def test_start_prices_change_the_work_not_the_optimum():
    rng = np.random.default_rng(3)
    cost = rng.random((120, 12))
    labels, prices = balanced_assign_with_prices(cost)
    again = balanced_assign(cost + rng.normal(0, 1e-3, cost.shape), prices)   # a k-means-like warm start
    cold = balanced_assign(cost + rng.normal(0, 1e-3, cost.shape))
    assert np.bincount(again, minlength=12).tolist() == [10] * 12
    assert np.bincount(cold, minlength=12).tolist() == [10] * 12
    # optimal prices reproduce the optimum with no repair at all
    assert np.array_equal(balanced_assign(cost, prices), labels)


def test_balanced_kmeans_is_balanced_and_deterministic():
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.normal(c, 0.05, (20, 3)) for c in np.eye(3) * 4]).astype(np.float64)
    labels = balanced_kmeans(pts, 3, seed=0)
    assert np.bincount(labels).tolist() == [20, 20, 20]
    # the three well-separated blobs are found exactly
    assert all(len(set(labels[i * 20:(i + 1) * 20])) == 1 for i in range(3))
    assert np.array_equal(labels, balanced_kmeans(pts, 3, seed=0))


def _sin_largest_angle(u: np.ndarray, v: np.ndarray) -> float:
    s = np.linalg.svd(np.linalg.qr(u)[0].T @ np.linalg.qr(v)[0], compute_uv=False)
    return float(np.sqrt(max(0.0, 1 - s.min() ** 2)))


def test_partial_eigensolver_finds_the_top_subspace_of_eigh():
    rng = np.random.default_rng(5)
    n, k = 600, 12
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    # a gap, and negative eigenvalues larger in magnitude than some wanted ones (the solver ranks algebraically)
    spectrum = np.r_[np.linspace(3, 2, k), rng.uniform(-2.5, 0.5, n - k)]
    a = torch.as_tensor((q * spectrum) @ q.T, dtype=torch.float32)
    vals, vecs = top_eigenvectors(a, k, seed=0)
    ref_vals, ref_vecs = np.linalg.eigh(a.double().numpy())
    assert np.allclose(vals, ref_vals[::-1][:k], rtol=1e-4, atol=1e-4)
    assert _sin_largest_angle(vecs, ref_vecs[:, -k:]) < 1e-2
    deeper = top_eigenvectors(a, k, seed=0, depth=12)[1]                   # a deeper Krylov space converges
    assert _sin_largest_angle(deeper, ref_vecs[:, -k:]) < 1e-5
    assert np.array_equal(vecs, top_eigenvectors(a, k, seed=0)[1])          # seeded: deterministic


def test_spectral_embedding_of_a_block_coactivation_graph():
    """Four groups of neurons that fire together: the embedding separates them and k-means recovers them. The
    graph is block-diagonal (eigenvalue 1 four times, the rest -1/99), so its Krylov space is exhausted after one
    product: the solver must still return an orthonormal basis."""
    rng = np.random.default_rng(2)
    n, groups_, T = 400, 4, 3000
    member = np.repeat(np.arange(groups_), n // groups_)
    active_group = rng.integers(0, groups_, T)
    scores = torch.as_tensor((member[None, :] == active_group[:, None]) + rng.random((T, n)) * 0.5,
                             dtype=torch.float32)
    counts = coactivation_counts(top_marks(scores[s:s + 1000], n // groups_) for s in range(0, T, 1000))
    dense = (scores >= scores.topk(n // groups_, dim=1).values[:, -1:]).float()
    expect = dense.t() @ dense
    expect.fill_diagonal_(0)
    assert counts.dtype == torch.float32 and torch.equal(counts, expect)     # exact counts
    emb = spectral_embedding(counts, groups_, seed=0)
    labels = balanced_kmeans(emb, groups_, seed=0)
    for g in range(groups_):
        assert len(set(labels[member == g])) == 1
