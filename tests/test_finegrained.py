"""finegrained: equal-size experts from importance co-activation, the shared expert holds the most important
neurons, exactness with every expert active, and a trained router that finds the oracle's experts."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.calibration import LayerCalib
from gguf_moeify.methods import FinegrainedOptions, MethodOptions
from gguf_moeify.methods.finegrained import expert_output_norms, importance, plan_layer, recall_at_k
from gguf_moeify.moe_torch import MoEMLP


def _layer(seed=0, d=16, d_ff=64, T=2000):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g)
    down = torch.randn(d, d_ff, generator=g) * torch.linspace(0.1, 2, d_ff)   # columns of different weight
    return gate, up, down, torch.randn(T, d, generator=g)


@pytest.mark.parametrize("router", ["mlp", "linear"])
def test_partition_shared_and_exactness(router):
    gate, up, down, x = _layer()
    opts = MethodOptions(experts=8, shared=2, top_k=2, own=FinegrainedOptions(router=router, router_hidden=32))
    plan = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    assert plan.experts.shape == (6, 8) and plan.shared_width == 16
    assert sorted(np.concatenate([plan.shared, plan.experts.reshape(-1)]).tolist()) == list(range(64))
    mean_imp = importance(x, gate, up, down, "weighted", F.silu).mean(0).numpy()
    assert mean_imp[plan.shared].min() >= mean_imp[plan.experts.reshape(-1)].max()
    assert plan.router.kind == router
    again = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    assert np.array_equal(plan.experts, again.experts)
    assert all(np.array_equal(plan.router.tensors[k], again.router.tensors[k]) for k in plan.router.tensors)
    plan = replace(plan, top_k=plan.n_experts)
    dense = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    assert torch.allclose(MoEMLP(plan, gate, up, down, F.silu)(x), dense, rtol=1e-4, atol=1e-4)


def test_weighted_statistic_differs_from_activation():
    gate, up, down, x = _layer()
    w = importance(x, gate, up, down, "weighted", F.silu)
    a = importance(x, gate, up, down, "activation", F.silu)
    assert torch.allclose(w, a * down.norm(dim=0))


@pytest.mark.parametrize("router,loss", [("linear", None), ("mlp", "mse"), ("mlp", "bce")])
def test_trained_router_finds_the_oracle_experts(router, loss):
    gate, up, down, x = _layer(seed=1, T=4000)
    own = FinegrainedOptions(router=router, router_hidden=64, router_loss=loss or "mse")
    opts = MethodOptions(experts=8, shared=0, top_k=2, own=own)
    plan = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    recall = plan.info["router_recall_at_k_heldout"]
    chance = 2 / 8
    assert recall > 2 * chance, recall
    # recall@k is measured against the oracle's output norms, which MoEMLP's oracle ranks by
    norms = expert_output_norms(x[:50], gate, up, down, plan.experts, F.silu)
    moe = MoEMLP(plan, gate, up, down, F.silu, oracle=True)
    picked = moe.select(x[:50])
    assert torch.equal(picked.sort(1).values, torch.topk(norms, 2, dim=1).indices.sort(1).values)


def test_recall_at_k_is_the_share_of_the_oracle_top_k_found():
    """Three tokens, four experts: the router's top-2 holds one of the oracle's top-2, none, both."""
    truth = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 5.0, 6.0, 0.0]])
    pred = torch.tensor([[4.0, 1.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0], [0.0, 9.0, 8.0, 1.0]])
    assert recall_at_k(pred, truth, 2) == pytest.approx((1 / 2 + 0 + 1) / 3)   # 0.5
    assert recall_at_k(pred, truth, 1) == pytest.approx(1 / 3)                 # top-1 agrees on the first token
    assert recall_at_k(pred, truth, 4) == 1.0                                   # every expert chosen


def test_default_shape_is_32_neuron_experts_within_llama_cpp_limit():
    from gguf_moeify.methods import resolve_options
    from gguf_moeify.sizing import fine_experts as default_experts
    assert default_experts(1536) == 48          # SmolLM2
    assert default_experts(11008) == 344        # Llama-2-7B
    assert default_experts(28672) == 448        # width 64: 896 experts of 32 would exceed 512
    opts = resolve_options("finegrained", MethodOptions(experts=None, shared=None), 1536)
    assert (opts.experts, opts.shared) == (48, 8)
    assert resolve_options("cmoe", MethodOptions(experts=None, shared=None), 1536).experts == 8


@pytest.mark.parametrize("max_experts,k_max", [(2.0, 8), (64.0, 14)])   # 14: every routed expert may be used
def test_per_token_counts_spend_the_calibrated_mean_where_outputs_are_large(max_experts, k_max):
    """--expert-counts per-token: the file's top_k is the most a token uses, the threshold (folded into the
    selection bias) gives the calibration tokens top-k experts on average, and tokens whose MLP output is larger
    get more experts; the torch reference computes exactly the chosen experts' sum."""
    gate, up, down, x = _layer(seed=2, T=4000)
    x = x * torch.linspace(0.3, 3.0, x.shape[0]).unsqueeze(1)   # tokens of very different weight
    opts = MethodOptions(experts=16, shared=2, top_k=4,
                         own=FinegrainedOptions(expert_counts="per-token", max_experts=max_experts))
    plan = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    assert plan.per_token_count and plan.top_k == k_max and plan.mean_top_k == 4.0
    assert plan.selection_bias.shape == (14,)
    assert plan.active_fraction() == pytest.approx((2 * 4 + 4 * 4) / 64)   # 16 experts of 4 neurons
    moe = MoEMLP(plan, gate, up, down, F.silu)
    idx, used = moe.select_weighted(x)
    counts = used.sum(1)
    assert counts.mean().item() == pytest.approx(4.0, abs=0.02)
    assert plan.info["mean_experts_heldout"] == pytest.approx(4.0, abs=0.5)
    assert counts.min() < 4 < counts.max() <= k_max
    assert counts[-1000:].mean() > 2 * counts[:1000].mean()   # the heavier tokens use more
    # the used experts are those scoring above 0 after the bias, and the output sums exactly those
    scores = x @ torch.as_tensor(plan.router.tensors["weight"]).t() + torch.as_tensor(plan.selection_bias)
    assert torch.equal(used.bool(), scores.gather(1, idx) > 0)
    h = F.silu(x @ gate.t()) * (x @ up.t())
    keep = torch.zeros_like(h)
    keep[:, torch.as_tensor(plan.shared)] = 1.0
    for t in range(x.shape[0]):
        for e in idx[t][used[t].bool()].tolist():
            keep[t, torch.as_tensor(plan.experts[e])] = 1.0
    ref = (h * keep) @ down.t()
    assert (moe(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("bad,message", [
    (dict(router="mlp"), "needs --router linear"),
    (dict(max_experts=0.5), "--max-experts must be"),
])
def test_per_token_counts_refuse_what_they_cannot_do(bad, message):
    from gguf_moeify.bundled import DEFAULT_CALIB
    from gguf_moeify.errors import UserError
    from gguf_moeify.methods import finegrained
    opts = MethodOptions(experts=16, shared=2, top_k=4, calib=DEFAULT_CALIB,
                         own=FinegrainedOptions(expert_counts="per-token", **bad))
    with pytest.raises(UserError, match=message):
        finegrained.validate(opts, 64)
    stock = MethodOptions(experts=16, shared=2, top_k=4, runtime="stock", calib=DEFAULT_CALIB,
                          own=FinegrainedOptions(expert_counts="per-token"))
    with pytest.raises(UserError, match="patched runtime"):
        finegrained.validate(stock, 64)
