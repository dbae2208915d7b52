"""``--runtime stock``: express a plan in an architecture that unmodified llama.cpp already runs.

Mapping (the stock architecture that expresses the plan best):

| source | plan | stock architecture | gating in stock llama.cpp |
|---|---|---|---|
| llama/mistral/SmolLM, qwen2 | shared expert | ``deepseek`` (1) | softmax over all E, not renormalised |
| llama/mistral/SmolLM, qwen2 | no shared expert | ``llama`` (the Mixtral path) | softmax, chosen renormalised to 1 |
| qwen3 | no shared expert | ``qwen3moe`` | softmax over all E, chosen renormalised to 1 |
| qwen3 | shared expert | none: stock qwen3moe has no shared expert (use ``-S 0`` or the patched runtime) | |
| gemma3 | any | none: stock gemma3 has no MoE path; gemma4's MoE layer norms its dense and routed outputs apart | |

(1) Llama attention with normal rope (Q/K permuted as for llama); deepseek's loader also takes Qwen2's optional
q/k/v biases; its shared expert is always on with weight 1 and n_expert_shared experts wide.

Unit gates through softmax gating: the router's logits are scaled by a small epsilon, so the softmax weights are
nearly equal (1/k for the chosen renormalised ones, 1/E without renormalisation), and the reciprocal (k or E) is
folded into the routed experts' down projections (``MoEPlan.expert_scale``). Softmax is monotonic, so the chosen
experts are the router's top-k as long as float32 still orders the scaled scores. epsilon is chosen per layer from
the calibration tokens: epsilon = DELTA / R with R the largest spread of the logits that enter the weights (of the
chosen experts when renormalised, of all experts otherwise), so every folded weight lies in [exp(-DELTA), exp(DELTA)]
on the calibration tokens (``stock_weight_error_bound`` in the file's plan metadata). DELTA = 1e-2: at 1e-3 the
scaled scores of the k-th and (k+1)-th experts came within float32 rounding of each other often enough that llama.cpp
and torch chose differently on a few tokens of a 512-token test (ppl off by 1.3e-3); at 1e-2 they agree to < 1e-6
(tests/test_stock_runtime.py) and the stock form's perplexity is within 1e-4 of the unit-gate plan's. How often the
stock choice equals the original router's on held-out calibration tokens is recorded too.

Non-linear routers (CMoE's analytic router, the MLP routers) have no stock form: a linear router is fitted to their
scores on the calibration tokens (ridge least squares), and how often the stock choice equals the original router's
choice is recorded per layer (``stock_router_agreement``: mean overlap of the two top-k sets on the held-out tenth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import UserError
from .plan import MoEPlan, Router
from .routers import fit_linear_to_scores, router_scores

DELTA = 1e-2
RUNTIMES = ("patched", "stock")


@dataclass(frozen=True)
class StockTarget:
    arch: str             # general.architecture of the file
    norm_weights: bool    # stock graph renormalises the chosen softmax weights
    permute_qk: bool      # llama.cpp "normal" rope for this architecture (Q/K rows permuted as for llama)


def stock_target(adapter_name: str, has_shared: bool) -> StockTarget:
    if adapter_name in ("llama", "qwen2"):
        return StockTarget("deepseek", False, True) if has_shared else StockTarget("llama", True, True)
    if adapter_name == "qwen3":
        if has_shared:
            raise UserError("--runtime stock: stock llama.cpp's qwen3moe has no shared expert; use --shared 0, or "
                            "the patched runtime")
        return StockTarget("qwen3moe", True, False)
    if adapter_name == "gemma3":
        raise UserError("--runtime stock: unmodified llama.cpp cannot run a Gemma 3 MoE (its gemma3 graph has no "
                        "experts, and gemma4's MoE layer normalises its dense and routed outputs separately and has "
                        "other attention); use the patched runtime")
    raise UserError(f"--runtime stock: no stock mapping for {adapter_name}")


def stock_file_target(adapter_name: str, has_shared: bool) -> str:
    """The ModelPlan target of a stock file (plan.TARGETS): "stock-" and the stock architecture."""
    return "stock-" + stock_target(adapter_name, has_shared).arch


def check_stock_options(opts, config: dict, adapter_name: str) -> None:
    """Cheap checks before any work."""
    if opts.router_dtype != "f32":
        raise UserError("--router-dtype f16 needs the patched runtime (a stock router's logits are scaled to a "
                        "spread of 0.01, so that its softmax weights stay within 1% of equal: f16 would reorder them)")
    if opts.layer_budget != "uniform":
        raise UserError("--layer-budget sensitivity needs the patched runtime (stock llama.cpp uses one top-k for "
                        "every layer)")
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}   # transformers 4 / 5 names
    kind = scaling.get("rope_type") or scaling.get("type")
    if opts.shared and kind not in (None, "default", "linear"):
        raise UserError(f"--runtime stock: {kind} rope scaling is not supported by stock deepseek (the architecture "
                        f"for plans with a shared expert); use --shared 0 or the patched runtime")
    stock_target(adapter_name, bool(opts.shared))


def _topk_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, torch.topk(scores, k, dim=1).indices, True)


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean fraction of the k chosen experts two score matrices agree on."""
    return float((_topk_sets(a, k) & _topk_sets(b, k)).sum(1).double().mean() / k)


def stock_form(plan: MoEPlan, adapter_name: str, x: torch.Tensor | None, act=None) -> MoEPlan:
    """``stockify`` for the stock architecture this plan's source and shared expert map to."""
    return stockify(plan, stock_target(adapter_name, plan.shared_width > 0), x, act)


def stockify(plan: MoEPlan, target: StockTarget, x: torch.Tensor | None, act=None) -> MoEPlan:
    """The plan as stock llama.cpp computes it: linear router (fitted if need be), epsilon-scaled logits, softmax
    gating, folded expert scale. ``x``: the layer's calibration MLP inputs (T, d), or None for data-free plans."""
    E, k = plan.n_experts, plan.top_k
    info = dict(plan.info)
    scale = float(k if target.norm_weights else E)
    if k == E and (x is None or plan.router.kind != "linear"):
        # every expert chosen: a zero router gives exactly equal weights 1/E (any router would do as well)
        d = x.shape[1] if x is not None else next(iter(plan.router.tensors.values())).shape[-1]
        router = Router("linear", {"weight": np.zeros((E, d), dtype=np.float32)})
        info.update(stock_eps=0.0, stock_weight_error_bound=0.0, stock_router_agreement=1.0)
        return replace(plan, router=router, gating="softmax", norm_weights=target.norm_weights, expert_scale=scale,
                       info=info)
    if k == 1 and target.norm_weights and plan.router.kind == "linear":
        # one chosen expert renormalised alone weighs p/p = 1 exactly: the unit-gate plan as it is, any router scale
        info.update(stock_eps=1.0, stock_weight_error_bound=0.0, stock_router_agreement=1.0,
                    stock_router_fitted=False)
        return replace(plan, gating="softmax", norm_weights=True, expert_scale=1.0, info=info)
    if x is None:
        raise UserError("--runtime stock with routed experts needs calibration inputs to choose the router scale: "
                        "use a data-driven method (--calib), or the patched runtime")
    x = x.float()
    original = router_scores(plan.router.kind, {n: torch.from_numpy(t) for n, t in plan.router.tensors.items()},
                             x, act)
    held = torch.arange(x.shape[0]) % 10 == 9
    if plan.router.kind == "linear":
        weight = plan.router.tensors["weight"]
    else:
        weight = fit_linear_to_scores(x[~held], original[~held])
    logits = x @ torch.from_numpy(weight).t()
    if target.norm_weights:
        chosen = torch.topk(logits, k, dim=1).values
        spread = float((chosen[:, 0] - chosen[:, -1]).max())
    else:
        spread = float((logits.max(1).values - logits.min(1).values).max())
    eps = DELTA / spread if spread > 0 else 1.0
    scaled = weight * np.float32(eps)
    stock_probs = torch.softmax(x @ torch.from_numpy(scaled).t(), dim=1)   # what stock llama.cpp sorts (float32)
    info.update(stock_eps=eps, stock_weight_error_bound=math.expm1(DELTA),
                stock_router_agreement=round(overlap(stock_probs[held], original[held], k), 6),
                stock_router_fitted=plan.router.kind != "linear")
    return replace(plan, router=Router("linear", {"weight": scaled}), gating="softmax",
                   norm_weights=target.norm_weights, expert_scale=scale, info=info)
