"""The routers' math, shared by the methods that fit them, the torch reference that runs them and the stock
transformation that refits them: scores of each router kind (what the patched llama.cpp graph computes), the
least-squares linear router on standardised log expert norms (finegrained, fine-tuning's refit), the 2-layer MLP
router (MoEfication's, finegrained --router mlp), and the linear router fitted to another router's scores (stock).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .linalg import ridge_least_squares

MLP_EPOCHS, MLP_LR, MLP_BATCH, MLP_PATIENCE, MLP_HELDOUT = 30, 0.01, 256, 3, 0.1


def router_scores(kind: str, t: dict[str, torch.Tensor], x: torch.Tensor, act=None,
                  dtype: str = "f32") -> torch.Tensor:
    """Router scores (T, E). ``act``: the MLP's activation (``Adapter.act``), which the CMoE analytic router applies
    (the other kinds do not use it). ``dtype`` "f16" (matrices stored in f16): each product's input is rounded to f16
    as well, as llama.cpp's CPU backend converts the activations to the weights' type before the dot products."""
    def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (a.to(torch.float16).to(a.dtype) if dtype == "f16" else a) @ w.t()
    if kind == "linear":
        return mm(x, t["weight"])
    if kind == "cmoe":
        if act is None:
            raise ValueError("the cmoe router applies the MLP's activation: pass act (Adapter.act)")
        return (mm(x, t["up"]) * act(mm(x, t["gate"]))).abs()
    if kind == "mlp":
        return mm(torch.tanh(mm(x, t["w1"]) + t["b1"]), t["w2"]) + t["b2"]
    raise ValueError(kind)


def log_norm_targets(norms: torch.Tensor) -> torch.Tensor:
    """Per-token standardised log output norms: what the regression routers predict (rank-preserving)."""
    y = torch.log(norms.double().clamp_min(1e-12))
    return (y - y.mean(1, keepdim=True)) / y.std(1, keepdim=True).clamp_min(1e-12)


def fit_linear_router(x: torch.Tensor, norms: torch.Tensor) -> np.ndarray:
    """Ridge least squares x W ≈ log_norm_targets (no bias: the runtime's linear router has none)."""
    return ridge_least_squares(x, log_norm_targets(norms))


def fit_log_norm_router(x: torch.Tensor, norms: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(weight (E, d), bias (E,)): ridge least squares x W + b ≈ log norms, *not* standardised per token, so the
    scores compare across tokens (a token whose MLP output matters more scores higher on every expert): what a
    per-token expert count thresholds. The bias is the file's selection bias (exp_probs_b)."""
    y = torch.log(norms.double().clamp_min(1e-12))
    w = ridge_least_squares(torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1), y)
    return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, -1])


def count_threshold(scores: torch.Tensor, mean_count: float, k_max: int) -> float:
    """The threshold t such that choosing, per row, the scores above t (at most ``k_max`` of them) chooses
    ``mean_count`` per row on average (bisection on t: the mean count falls as t rises)."""
    top = torch.topk(scores.double(), k_max, dim=1).values
    lo, hi = float(top.min()) - 1.0, float(top.max()) + 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if (top > mid).sum(1).double().mean() > mean_count:
            lo = mid
        else:
            hi = mid
    return hi


def fit_linear_to_scores(x: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """Ridge least squares x W ≈ scores: a linear router imitating a non-linear one (the stock form)."""
    return ridge_least_squares(x, scores)


def train_mlp_router(x: torch.Tensor, target: torch.Tensor, seed: int = 0, epochs: int = MLP_EPOCHS,
                     return_history: bool = False, hidden: int | None = None, loss: str = "bce"):
    """x (T, d), target (T, E) -> dict of router tensors (w1, b1, w2, b2) taking raw x, and optionally the
    held-out loss per epoch (index 0: before training). ``hidden``: width of the tanh layer (default E, the
    paper's). ``loss``: "bce" (BCE-with-logits, targets in [0, 1]) or "mse" (regression on real targets).
    Runs on one thread: the steps are tiny, and torch's thread pool on a busy machine made them 50-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_mlp_router(x, target, seed, epochs, return_history, hidden, loss)
    finally:
        torch.set_num_threads(threads)


def _train_mlp_router(x, target, seed, epochs, return_history, hidden, loss):
    gen = torch.Generator().manual_seed(seed)
    T, d = x.shape
    E = target.shape[1]
    perm = torch.randperm(T, generator=gen)
    n_hold = max(1, int(round(MLP_HELDOUT * T)))
    hold, train = perm[:n_hold], perm[n_hold:]
    x = x.float()
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    H = hidden or E
    l1, l2 = torch.nn.Linear(d, H), torch.nn.Linear(H, E)
    with torch.no_grad():
        for lin in (l1, l2):
            bound = 1 / lin.in_features ** 0.5
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=gen) * 2 - 1) * bound)
    params = list(l1.parameters()) + list(l2.parameters())
    opt = torch.optim.Adam(params, lr=MLP_LR)

    criterion = F.binary_cross_entropy_with_logits if loss == "bce" else F.mse_loss

    def loss_on(idx):
        return criterion(l2(torch.tanh(l1(xs[idx]))), target[idx])

    with torch.no_grad():
        best = loss_on(hold).item()
    history = [best]
    best_state = [p.detach().clone() for p in params]
    stale = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=gen)]
            for s in range(0, len(order), MLP_BATCH):
                opt.zero_grad()
                loss = loss_on(order[s:s + MLP_BATCH])
                loss.backward()
                opt.step()
            with torch.no_grad():
                held = loss_on(hold).item()
            history.append(held)
            if held < best - 1e-7:
                best, stale = held, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= MLP_PATIENCE:
                    break
    w1, b1, w2, b2 = (t.double() for t in best_state)
    # fold the standardisation into the first layer: w1 ((x - mu) / sd) + b1 = (w1 / sd) x + (b1 - (w1 / sd) mu)
    w1f = w1 / sd.double()[None, :]
    b1f = b1 - w1f @ mu.double()
    tensors = {"w1": w1f.float().numpy(), "b1": b1f.float().numpy(), "w2": w2.float().numpy(),
               "b2": b2.float().numpy()}
    return (tensors, history) if return_history else tensors
