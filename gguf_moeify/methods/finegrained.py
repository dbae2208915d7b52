"""gguf_moeify's own recipe (``--method finegrained``): many small experts carved by importance-weighted
co-activation, a shared expert of the most important neurons, and a router fitted to predict experts' output norms.

Why (METHODS.md, "What limits quality"): the information for sparsity is in the dense model (a per-token oracle
over single neurons loses ~3% at 50% active) but coarse experts throw it away. So, per layer, on the calibration
MLP inputs x (layer-sequential, like CMoE/MoEfication):

1. Importance of neuron i on token t: a_ti = |h_ti| * ||W_down[:, i]||, h = silu(W_gate x) ⊙ (W_up x) — the size of
   the neuron's contribution to the layer output (``--stat weighted``, default); ``--stat activation`` uses |h_ti|
   alone, the papers' statistic, for comparison.
2. Shared expert: the S * m neurons with the largest mean importance (m = d_ff / E).
3. Routed experts: each token marks its top-q remaining neurons by importance, q = the routed share of the active
   budget (at least 5%); co-activation graph A_ij = Σ_t mark_ti mark_tj (exact counts in float32), spectral
   embedding (top E - S eigenvectors of D^-1/2 A D^-1/2 by a partial seeded eigensolver, rows normalised) and exact
   balanced k-means into E - S experts of m neurons (MoEfication's co-activation split, with importance marks
   instead of activation marks; _spectral.py, _balanced.py).
4. Router (``--router``): trained to predict, per token, each routed expert's output norm ||W_down_e h_e|| on the
   calibration tokens (the quantity the oracle ranks by), as per-token standardised log norms. The norms come
   from the activations h kept from step 1 and each expert's m x m Gram matrix W_down_e^T W_down_e
   (||W_down_e h_e||^2 = h_e^T G_e h_e: m^2 instead of m * d multiply-adds per token and expert).
   * ``linear`` (default): ridge least squares from raw x (the runtime's linear router has no bias); costs
     d x (E - S) per token.
   * ``mlp``: Linear(d -> H) -> tanh -> Linear(H -> E - S) regressing the same targets (MSE; MoEfication's trainer:
     Adam, held-out split, early stopping); H = ``--router-hidden`` (default 256). ``router_loss="bce"`` (API
     only) trains on the oracle's 0/1 top-k choices instead.
   Measured on SmolLM2 at 50% active (S8A16E48, 8 x 512 calibration tokens, 4 eval windows): linear 2.36x,
   mlp H=256 2.29x, mlp H=128 2.49x, mlp BCE on choices 2.65x the dense perplexity; the linear router is the
   default for its cost (2% of the active expert compute vs 11% for H=256).
   Router recall@k against the oracle on the held-out 10% of calibration tokens is recorded in the plan's info.
   * ``--expert-counts per-token``: the linear router predicts the *raw* log norms, with a per-expert bias (the
     file's selection bias), so its scores compare across tokens; a token uses the experts scoring above a
     threshold (folded into the bias), at most ``--max-experts`` x top-k, the threshold set per layer so that the
     calibration tokens use top-k experts on average. Tokens whose MLP output matters more get more experts.
5. Gates exactly 1, as every seed method.

Defaults: E = d_ff / 32 (``sizing.fine_experts``), S = E / 6, top-k: the number of routed experts bringing (S + k) / E
nearest 50%.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..sizing import active_fraction_default
from ..plan import MoEPlan, Router
from ..timing import phase
from .options import FinegrainedOptions, MethodOptions, check_common
from ._balanced import balanced_kmeans, groups
from ._spectral import coactivation_counts, spectral_embedding, top_marks
from ..routers import (count_threshold, fit_linear_router, fit_log_norm_router, log_norm_targets, router_scores,
                       train_mlp_router)

NAME = "finegrained"
OPTIONS = FinegrainedOptions
needs_calibration = True
whole_model = False
CHUNK = 4096
MIN_MARK_FRACTION = 0.05
HELDOUT = 0.1


def validate(opts: MethodOptions, d_ff: int) -> None:
    from ..calibration import check_calib_options
    check_common(opts, d_ff)
    check_calib_options(opts, NAME)
    own = opts.own_for(FinegrainedOptions)
    if not 1 <= own.router_hidden <= 65536:
        raise UserError(f"--router-hidden must be between 1 and 65536, got {own.router_hidden}")
    if own.expert_counts == "per-token":
        if own.router != "linear":
            raise UserError("--expert-counts per-token needs --router linear (its scores are thresholded)")
        if opts.runtime != "patched":
            raise UserError("--expert-counts per-token needs the patched runtime; unmodified llama.cpp uses a "
                            "fixed number of experts per token (--runtime stock: --expert-counts fixed)")
        if opts.layer_budget != "uniform":
            raise UserError("--expert-counts per-token already spends the budget where it matters; it does not "
                            "combine with --layer-budget sensitivity")
        if not 1.0 <= own.max_experts <= 64.0:
            raise UserError(f"--max-experts must be between 1 and 64, got {own.max_experts}")


def default_top_k(opts: MethodOptions) -> int:
    return active_fraction_default(opts.experts, opts.shared)


def _h_chunks(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act, chunk: int = CHUNK):
    g, u = gate.float(), up.float()
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk].float()
        yield s, act(xc @ g.t()) * (xc @ u.t())


@torch.no_grad()
def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """(T, d_ff) float32 h = silu(W_gate x) ⊙ (W_up x) for every row of x."""
    out = torch.empty(x.shape[0], gate.shape[0])
    for s, h in _h_chunks(x, gate, up, act):
        out[s:s + h.shape[0]] = h
    return out


def neuron_weights(down: torch.Tensor, stat: str) -> torch.Tensor:
    """(d_ff,) the factor turning |h| into importance: ||W_down[:, i]|| (weighted) or 1 (activation)."""
    return down.float().norm(dim=0) if stat == "weighted" else torch.ones(down.shape[1])


@torch.no_grad()
def importance(x, gate, up, down, stat: str, act) -> torch.Tensor:
    """(T, d_ff) float32 per-token neuron importance."""
    return activations(x, gate, up, act).abs_().mul_(neuron_weights(down, stat))


@torch.no_grad()
def _mean_importance(h: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """Mean over tokens of |h| * w, summed in float64 one chunk of tokens at a time."""
    total = torch.zeros(h.shape[1], dtype=torch.float64)
    for s in range(0, h.shape[0], CHUNK):
        total += (h[s:s + CHUNK].abs() * w).sum(0, dtype=torch.float64)
    return (total / h.shape[0]).numpy()


@torch.no_grad()
def _importance_marks(h: torch.Tensor, w: torch.Tensor, cols: np.ndarray, q: float):
    """Chunks of int8 marks: each token's top-q neurons among ``cols`` by importance |h| * w."""
    idx = torch.as_tensor(cols)
    top = max(1, int(round(q * len(cols))))
    wc = w[idx]
    for s in range(0, h.shape[0], CHUNK):
        yield top_marks(h[s:s + CHUNK][:, idx].abs_().mul_(wc), top)


@torch.no_grad()
def expert_output_norms(x, gate, up, down, experts: np.ndarray, act) -> torch.Tensor:
    """(T, E) ||W_down_e h_e|| per token and expert: what the oracle ranks by."""
    ex = torch.as_tensor(experts.reshape(-1))
    h = activations(x, gate[ex], up[ex], act)
    return _norms_from_activations(h, down[:, ex], np.arange(ex.numel()).reshape(experts.shape))


@torch.no_grad()
def _norms_from_activations(h: torch.Tensor, down: torch.Tensor, experts: np.ndarray) -> torch.Tensor:
    """(T, E) output norms from the activations h (T, n) and down (d, n), ``experts`` (E, m) indexing their
    columns: ||W_e h_e||^2 = h_e^T (W_e^T W_e) h_e with float64 m x m Gram matrices (clipped at 0 against
    rounding), one block of tokens at a time."""
    n_experts, m = experts.shape
    ex = torch.as_tensor(experts.reshape(-1))
    w = down[:, ex].double().t().reshape(n_experts, m, -1)              # (E, m, d)
    gram = torch.bmm(w, w.transpose(1, 2))                               # (E, m, m)
    out = torch.empty(h.shape[0], n_experts)
    rows = max(1, min(CHUNK, 2 ** 24 // ex.numel()))                     # (rows, E*m) float64 blocks <= 128 MiB
    for s in range(0, h.shape[0], rows):
        he = h[s:s + rows][:, ex].double().reshape(-1, n_experts, m).transpose(0, 1)   # (E, rows, m)
        sq = (torch.bmm(he, gram) * he).sum(-1)                          # (E, rows)
        out[s:s + rows] = sq.clamp_min_(0).sqrt_().t().float()
    return out


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    mask.scatter_(1, torch.topk(scores, k, dim=1).indices, 1.0)
    return mask


def recall_at_k(pred: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Mean fraction of the oracle's top-k found in the router's top-k."""
    return float((_topk_mask(pred, k) * _topk_mask(truth, k)).sum(1).mean() / k)


def plan_layer(layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               opts: MethodOptions, stats=None) -> MoEPlan:
    if stats is None:
        raise UserError(f"{NAME} needs calibration data (--calib)")
    own = opts.own_for(FinegrainedOptions)
    stat, router_kind = own.stat, own.router
    d_ff = gate.shape[0]
    m = d_ff // opts.experts
    k = opts.routed
    top_k = opts.top_k if opts.top_k is not None else default_top_k(opts)
    x = stats.x.float()

    with phase("statistics"):
        h = activations(x, gate, up, stats.act)
        w = neuron_weights(down, stat)
        mean_imp = _mean_importance(h, w)
        order = np.lexsort((np.arange(d_ff), -mean_imp))
        shared = np.sort(order[:opts.shared * m])
        rest = np.sort(order[opts.shared * m:])
        q = max(MIN_MARK_FRACTION, top_k / k)
        counts = coactivation_counts(_importance_marks(h, w, rest, q))
    with phase("partition"):
        emb = spectral_embedding(counts, k, seed=stats.seed)
        del counts
        experts = groups(balanced_kmeans(emb, k, seed=stats.seed), rest, k)
    with phase("router"):
        norms = _norms_from_activations(h, down, experts)
        del h
        if own.expert_counts == "per-token":
            router, counts, info = _fit_count_router(x, norms, top_k, min(k, round(own.max_experts * top_k)),
                                                     stats.seed)
        else:
            (router, info), counts = _fit_router(x, norms, opts, top_k, stats.seed), {"top_k": top_k}
    info = {"stat": stat, "router": router_kind, "calib_tokens": int(x.shape[0]), "mark_fraction": round(q, 4),
            **info}
    return MoEPlan(layer=layer, d_ff=d_ff, experts=experts, router=router, shared=shared, info=info, **counts)


def _heldout_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows, training rows) of n calibration tokens: a seeded HELDOUT share held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(round(HELDOUT * n)))
    return perm[:n_hold], perm[n_hold:]


def _fit_count_router(x, norms, mean_k: int, k_max: int, seed: int):
    """Per-token counts: (the linear router on raw log norms, the plan's count fields, info). The threshold is set
    on every calibration token; the held-out share reports recall@k at the mean count and the count it uses."""
    hold, train = _heldout_split(x.shape[0], seed)
    weight, bias = fit_log_norm_router(x[train], norms[train])
    scores = x @ torch.as_tensor(weight).t() + torch.as_tensor(bias)
    threshold = count_threshold(scores, mean_k, k_max)
    held = torch.topk(scores[hold], k_max, dim=1).values > threshold
    info = {"router_recall_at_k_heldout": round(recall_at_k(scores[hold], norms[hold], mean_k), 4),
            "mean_experts_heldout": round(float(held.sum(1).double().mean()), 3)}
    counts = {"top_k": k_max, "per_token_count": True, "mean_top_k": float(mean_k),
              "selection_bias": (bias - threshold).astype(np.float32)}
    return Router("linear", {"weight": weight}), counts, info


def _fit_router(x, norms, opts, top_k, seed):
    """The router predicting the experts' output norms (``--router``), and its part of the plan's info: held-out
    recall@k against the oracle."""
    hold, train = _heldout_split(x.shape[0], seed)
    info: dict = {}
    own = opts.own_for(FinegrainedOptions)
    if own.router == "mlp":
        hidden, loss = own.router_hidden, own.router_loss
        target = _topk_mask(norms, top_k) if loss == "bce" else log_norm_targets(norms).float()
        router = Router("mlp", train_mlp_router(x, target, seed=seed, hidden=hidden, loss=loss))
        info.update(router_hidden=hidden, router_loss=loss)
    else:
        router = Router("linear", {"weight": fit_linear_router(x[train], norms[train])})
    pred = router_scores(router.kind, {n: torch.as_tensor(t) for n, t in router.tensors.items()}, x[hold])
    info["router_recall_at_k_heldout"] = round(recall_at_k(pred, norms[hold], top_k), 4)
    return router, info
