"""Co-activation graphs and their spectral embedding, shared by MoEfication's coact split and finegrained.

Memory: the marks as int8 (tokens x n, twice: the product wants the transpose contiguous) and one float32 n x n
matrix, normalised in place; no float64 n x n copy (n = 14336: 0.8 GB instead of the 1.6 GB float64 matrix plus
its normalised copies). The counts are exact: an int8 x int8 -> int32 product of 0/1 marks (AMX/VNNI kernels
where the CPU has them), held in float32 (exact below 2^24 tokens).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from ..linalg import top_eigenvectors

CONVERT_ROWS = 1024     # rows converted int32 -> float32 in place at a time
# Graphs up to this many neurons get the exact float64 eigh (n = 2048: a few seconds; n = 4064 took 65 s a layer
# on 2 cores, more than the partial solver at n = 13568); larger ones the partial solver. On SmolLM2 (n = 1280, finegrained at 50%) the Krylov eigenvectors (top-k subspace within sin 0.016
# of eigh's) gave a clustering 6% worse in perplexity than eigh's (2.62x against 2.47x the dense model).
EXACT_EIGH_MAX = 2048


def top_marks(scores: torch.Tensor, top: int) -> torch.Tensor:
    """(rows, n) int8: 1 at each row's ``top`` largest scores (torch.topk's choice on ties; unsorted, which is
    the same set 2-3x faster for the large ``top`` of finegrained's marks)."""
    mark = torch.zeros(scores.shape, dtype=torch.int8)
    mark.scatter_(1, torch.topk(scores, top, dim=1, sorted=False).indices, 1)
    return mark


@torch.no_grad()
def coactivation_counts(marks: Iterable[torch.Tensor]) -> torch.Tensor:
    """(n, n) float32: A_ij = number of rows (tokens) in which neurons i and j are both marked, diagonal 0, from
    chunks of (rows, n) int8 0/1 marks."""
    m = torch.cat(list(marks))
    counts = _int_gram(m)
    del m
    out = counts.view(torch.float32)             # the same memory, reinterpreted row block by row block
    for r in range(0, out.shape[0], CONVERT_ROWS):
        out[r:r + CONVERT_ROWS] = counts[r:r + CONVERT_ROWS].to(torch.float32)
    out.fill_diagonal_(0)
    return out


def _int_gram(m: torch.Tensor) -> torch.Tensor:
    """m^T m as int32 for an int8 matrix m."""
    if hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(m.t().contiguous(), m)
        except RuntimeError:      # a build without the CPU int8 kernel
            pass
    mf = m.to(torch.float32)
    return (mf.t() @ mf).round_().to(torch.int32)


@torch.no_grad()
def spectral_embedding(a: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Rows of the top-k eigenvectors of D^-1/2 A D^-1/2 for a symmetric co-activation matrix A (float32, zero
    diagonal; normalised IN PLACE), each row L2-normalised (Ng-Jordan-Weiss), eigenvector signs fixed for
    determinism. The eigenvectors come from a dense eigh up to ``EXACT_EIGH_MAX`` neurons, beyond from the partial
    solver (linalg.top_eigenvectors, seeded with ``seed``)."""
    deg = a.sum(1, dtype=torch.float64)
    inv = torch.where(deg > 0, deg.clamp_min(1e-300).rsqrt(), torch.zeros_like(deg)).to(a.dtype)
    a.mul_(inv[:, None]).mul_(inv[None, :])
    if a.shape[0] <= EXACT_EIGH_MAX:
        vecs = torch.linalg.eigh(a.double())[1]
        emb = vecs.flip(1)[:, :k].numpy()
    else:
        _, emb = top_eigenvectors(a, k, seed=seed)
    emb = emb * np.sign(emb[np.abs(emb).argmax(0), np.arange(k)])
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1)
