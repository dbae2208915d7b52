"""Per-layer expert budgets (``--layer-budget sensitivity``): spread a global number of active experts over the
layers by how much each layer's output suffers when it uses fewer experts.

During the layer-sequential calibration pass, each layer's MoE MLP (with its real router) is scored on a sample of
calibration tokens for every k = 1..E_r: e(k) = Σ_t ||moe_k(x_t) - mlp(x_t)||² / Σ_t ||r_t + mlp(x_t)||², the MLP
output error relative to the energy of the residual stream it is added to (r = the residual after attention), so
layers are compared on the scale at which their error reaches the next layer. Then the k_i minimising Σ_i e_i(k_i)
under Σ_i k_i = n_layers * k (the uniform budget, so the file's average active fraction is the requested one) and
max(1, k/2) <= k_i <= min(2k, E_r) are found exactly by dynamic programming over layers. The bounds are there because
the proxy compares layers only roughly: on SmolLM2 a massive-activation channel appearing at layer 11 inflates the
residual norm, and the unbounded optimum gave the later layers k = 1 (3.6x the perplexity of the uniform budget).

The calibration states for later layers are propagated with the uniform k (the allocation is only known at the
end): a first-order approximation, documented in the README.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_TOKENS = 2048


@torch.no_grad()
def error_curve(moe, x: torch.Tensor, resid: torch.Tensor, dense_out: torch.Tensor) -> np.ndarray:
    """e(k) for k = 1..E_r (index k-1) for an MoEMLP ``moe`` on MLP inputs x (T, d); resid and dense_out (T, d)."""
    x, resid, dense_out = x.float(), resid.float(), dense_out.float()
    n_exp = moe.gate_exps.shape[0]
    order = torch.argsort(moe.scores(x), dim=1, descending=True)
    acc = torch.zeros_like(x)
    if moe.has_shared:
        acc += (moe.act(x @ moe.gate_shexp.t()) * (x @ moe.up_shexp.t())) @ moe.down_shexp.t()
    scale = float((resid + dense_out).pow(2).sum())
    curve = np.empty(n_exp)
    for k in range(n_exp):
        # add each token's k-th ranked expert; computed per expert on its tokens (no (E, T, d) buffer)
        col = order[:, k]
        for e in col.unique().tolist():
            rows = (col == e).nonzero().squeeze(-1)
            acc.index_add_(0, rows, moe._expert(e, x[rows]))
        curve[k] = float((acc - dense_out).pow(2).sum()) / max(scale, 1e-30)
    return curve


def sample_rows(n: int, seed: int, size: int = SAMPLE_TOKENS) -> torch.Tensor:
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def allocate(curves: list[np.ndarray], total: int, k_min: int = 1, k_max: int | None = None) -> list[int]:
    """Exact minimum of Σ_i curves[i][k_i - 1] with Σ_i k_i = total and k_min <= k_i <= min(k_max, len(curves[i]))."""
    n = len(curves)
    sizes = [min(len(c), k_max or len(c)) for c in curves]
    if not n * k_min <= total <= sum(sizes):
        raise ValueError(f"budget {total} outside [{n * k_min}, {sum(sizes)}]")
    inf = float("inf")
    # best[j] = least error of the layers so far using j experts in all; choice[i][j] = k of layer i there
    best = np.full(total + 1, inf)
    best[0] = 0.0
    choice = []
    for c, size in zip(curves, sizes):
        nxt = np.full(total + 1, inf)
        arg = np.zeros(total + 1, dtype=np.int64)
        for k in range(k_min, size + 1):
            cand = np.full(total + 1, inf)
            cand[k:] = best[:total + 1 - k] + c[k - 1]
            better = cand < nxt
            nxt[better], arg[better] = cand[better], k
        best = nxt
        choice.append(arg)
    ks, j = [], total
    for arg in reversed(choice):
        ks.append(int(arg[j]))
        j -= ks[-1]
    return ks[::-1]
