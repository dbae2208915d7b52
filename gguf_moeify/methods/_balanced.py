"""Exact balanced assignment and balanced k-means, shared by CMoE and MoEfication.

Balanced assignment of n = k * m points to k clusters of exactly m points minimising the total cost is a linear
assignment problem once every cluster's cost column is replicated m times (each copy is one "seat");
``scipy.optimize.linear_sum_assignment`` (a Jonker-Volgenant variant) solves it exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def balanced_assign(cost: np.ndarray) -> np.ndarray:
    """cost (n, k) with k | n -> labels (n,) in 0..k-1, each label exactly n/k times, total cost minimal."""
    n, k = cost.shape
    if n % k:
        raise ValueError(f"{n} points cannot be split into {k} equal clusters")
    m = n // k
    rows, cols = linear_sum_assignment(np.repeat(np.asarray(cost, dtype=np.float64), m, axis=1))
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = cols // m
    return labels


def balanced_kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 8) -> np.ndarray:
    """Balanced k-means (squared L2) on points (n, dim): k-means++ initialisation from a seeded generator, then
    alternating exact balanced assignment and centre update until the labels stop changing (at most ``iters``).
    Returns labels (n,), each cluster of exactly n/k points."""
    pts = np.asarray(points, dtype=np.float64)
    n = pts.shape[0]
    rng = np.random.default_rng(seed)
    sq = (pts ** 2).sum(1)
    centres = [pts[rng.integers(n)]]
    d2 = np.maximum(sq - 2 * pts @ centres[0] + centres[0] @ centres[0], 0)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        c = pts[rng.choice(n, p=p)]
        centres.append(c)
        d2 = np.minimum(d2, np.maximum(sq - 2 * pts @ c + c @ c, 0))
    centres = np.stack(centres)
    labels = None
    for _ in range(iters):
        cost = sq[:, None] - 2 * pts @ centres.T + (centres ** 2).sum(1)[None, :]
        new = balanced_assign(cost)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([pts[labels == j].mean(0) for j in range(k)])
    return labels


def groups(labels: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """(k, m) sorted neuron indices per cluster."""
    return np.stack([np.sort(idx[labels == j]) for j in range(k)])


def spectral_embedding(A: torch.Tensor, k: int) -> np.ndarray:
    """Rows of the top-k eigenvectors of D^-1/2 A D^-1/2 for a symmetric co-activation matrix A (float64, zero
    diagonal), each row L2-normalised (Ng-Jordan-Weiss), eigenvector signs fixed for determinism."""
    deg = A.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    _, vecs = torch.linalg.eigh(inv[:, None] * A * inv[None, :])     # ascending eigenvalues
    emb = vecs[:, -k:].numpy()
    emb = emb * np.sign(emb[np.abs(emb).argmax(0), np.arange(k)])
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1)
