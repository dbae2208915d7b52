"""Small numerical helpers shared by methods and runtimes."""
from __future__ import annotations

import numpy as np
import torch

GRAM_CHUNK = 4096      # rows of x per float64 product in the normal equations


def ridge_least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> np.ndarray:
    """W (outputs, d) minimising ||x W^T - y||^2 + lambda ||W||^2 (no bias: the runtimes' linear routers have none),
    lambda = ``ridge`` x the mean diagonal of x^T x; float64 normal equations, summed over chunks of rows, so the
    float64 copy is of one chunk, not of x."""
    d = x.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    rhs = torch.zeros(d, y.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], GRAM_CHUNK):
        xc = x[s:s + GRAM_CHUNK].double()
        gram += xc.t() @ xc
        rhs += xc.t() @ y[s:s + GRAM_CHUNK].double()
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=torch.float64), rhs)
    return w.t().float().numpy()


KRYLOV_OVERSAMPLE = 8   # block width beyond the k vectors wanted
KRYLOV_DEPTH = 8        # products with the matrix after the first (q): q + 1 products of an (n, b) block in all


@torch.no_grad()
def top_eigenvectors(a: torch.Tensor, k: int, seed: int = 0, depth: int = KRYLOV_DEPTH,
                     oversample: int = KRYLOV_OVERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues (k,), eigenvectors (n, k)) for the k largest eigenvalues of the symmetric matrix ``a``
    (float32), largest first.

    Randomised block Krylov iteration with Rayleigh-Ritz (Musco & Musco, NeurIPS 2015): a Gaussian block of
    b = k + ``oversample`` columns (seeded), the basis [X, A X, ..., A^q X] made orthonormal block by block (two
    passes of block Gram-Schmidt, float32), and the eigenpairs of the projected matrix (float64). Cost: q + 1
    products of A with an (n, b) block plus O(n (q b)^2) for the basis, instead of a full eigendecomposition's
    O(n^3); Rayleigh-Ritz picks the largest eigenvalues algebraically (negative ones of large magnitude do not take
    their place, as in plain subspace iteration). On SmolLM2's co-activation graphs q = 8 gives the top-k subspace
    within sin 6e-4 of eigh's (largest principal angle). When the basis would span a large part of the space a
    dense ``eigh`` is cheaper and exact, and is used instead."""
    n = a.shape[0]
    b = min(n, k + oversample)
    if b * (depth + 1) * 2 >= n:
        vals, vecs = torch.linalg.eigh(a.double())
        return vals.flip(0)[:k].numpy(), vecs.flip(1)[:, :k].numpy()
    gen = torch.Generator().manual_seed(seed)
    q0, _ = torch.linalg.qr(torch.randn(n, b, generator=gen))
    basis, products = [q0.to(a.dtype)], []
    for j in range(depth + 1):
        z = a @ basis[j]
        products.append(z)
        if j == depth:
            break
        for _ in range(2):
            for qi in basis:
                z = z - qi @ (qi.t() @ z)
        basis.append(torch.linalg.qr(z)[0])
    basis_m = torch.cat(basis, 1)
    proj = (basis_m.t() @ torch.cat(products, 1)).double()
    del products
    vals, vecs = torch.linalg.eigh((proj + proj.t()) / 2)
    order = torch.argsort(vals, descending=True, stable=True)[:k]
    return vals[order].numpy(), (basis_m @ vecs[:, order].to(basis_m.dtype)).double().numpy()
