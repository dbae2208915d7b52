"""The balanced assignment (a transportation problem solved on the k clusters, never n x n) against the exact
replicated-column linear assignment, and the balanced k-means built on it. Small shapes only: speed is measured by
scripts/bench_scaling.py, not here."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from gguf_moeify.methods._balanced import balanced_assign, balanced_assign_with_prices, balanced_kmeans


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
