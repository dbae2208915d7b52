"""MoEfication: equal-size experts from both splits, exactness with every expert active, the trained MLP router
lowers its held-out loss, determinism, the oracle, and the GGUF router tensors."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.adapters import adapter_for
from gguf_moeify.calibration import LayerCalib
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import convert, make_plans
from gguf_moeify.methods import MethodOptions, MoEficationOptions
from gguf_moeify.methods.moefication import plan_layer
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.routers import router_scores, train_mlp_router
from gguf_moeify.reference import load_dense, logits_fn, moeify_

from gguf_moeify.bundled import EVAL_EXCERPT

CALIB = str(EVAL_EXCERPT)


def _layer(seed=0, d=16, d_ff=64, T=300):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g), torch.randn(d, d_ff, generator=g),
            torch.randn(T, d, generator=g))


@pytest.mark.parametrize("split", ["param", "coact"])
@pytest.mark.parametrize("shared", [0, 2])
def test_splits_are_equal_size_partitions(split, shared):
    gate, up, down, x = _layer()
    opts = MethodOptions(experts=8, shared=shared, top_k=2, own=MoEficationOptions(split=split, router="similarity"))
    plan = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    assert plan.experts.shape == (8 - shared, 8) and plan.shared_width == 8 * shared
    every = np.concatenate([plan.shared, plan.experts.reshape(-1)])
    assert sorted(every.tolist()) == list(range(64))
    again = plan_layer(0, gate, up, down, opts, LayerCalib(x=x, act=F.silu))
    assert np.array_equal(plan.experts, again.experts)
    # similarity router = mean normalised gate rows of each expert, as a linear router
    gn = torch.nn.functional.normalize(gate, dim=1)
    assert np.allclose(plan.router.tensors["weight"], gn[torch.as_tensor(plan.experts)].mean(1).numpy(), atol=1e-6)


def test_mlp_router_training_lowers_heldout_loss_and_folds_standardisation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=g) * 5 + 3                       # un-normalised inputs
    logits = torch.tanh(x @ torch.randn(12, 6, generator=g) / 10) @ torch.randn(6, 6, generator=g)
    target = torch.softmax(logits, 1)
    tensors, hist = train_mlp_router(x, target, seed=1, return_history=True)
    assert min(hist) < 0.9 * hist[0]
    again = train_mlp_router(x, target, seed=1)
    assert all(np.array_equal(tensors[k], again[k]) for k in tensors)
    # the written router takes raw x: its ranking agrees with the targets on most tokens
    s = router_scores("mlp", {k: torch.as_tensor(v) for k, v in tensors.items()}, x)
    assert (s.argmax(1) == target.argmax(1)).float().mean() > 0.6


def test_oracle_picks_experts_by_output_norm():
    gate, up, down, x = _layer(1)
    plan = plan_layer(0, gate, up, down, MethodOptions(experts=8, top_k=2, own=MoEficationOptions(split="param")),
                      LayerCalib(x=x, act=F.silu))
    moe = MoEMLP(plan, gate, up, down, F.silu, oracle=True)
    xt = x[:10]
    norms = torch.stack([moe._expert(e, xt).norm(dim=-1) for e in range(8)], -1)
    assert torch.equal(moe.select(xt).sort(1).values, torch.topk(norms, 2).indices.sort(1).values)
    # the oracle beats the similarity router at reconstructing the dense output
    dense = (torch.nn.functional.silu(xt @ gate.t()) * (xt @ up.t())) @ down.t()
    err_oracle = (moe(xt) - dense).norm()
    moe.oracle = False
    assert err_oracle <= (moe(xt) - dense).norm()
    # the neuron oracle keeps, per token, the 16 neurons (2 experts x 8) of largest |h_i| * ||W_down[:, i]||
    moe.oracle = "neuron"
    h = torch.nn.functional.silu(xt @ gate.t()) * (xt @ up.t())
    keep = torch.topk(h.abs() * down.norm(dim=0), 16, dim=1).indices
    want = (h * torch.zeros_like(h).scatter_(1, keep, 1.0)) @ down.t()
    assert torch.allclose(moe(xt), want, rtol=1e-4, atol=1e-4)
    assert (moe(xt) - dense).norm() <= err_oracle


def test_variable_count_oracles_spend_the_same_mean_where_outputs_are_largest():
    gate, up, down, x = _layer(2)
    plan = plan_layer(0, gate, up, down, MethodOptions(experts=8, top_k=2, own=MoEficationOptions(split="param")),
                      LayerCalib(x=x, act=F.silu))
    moe = MoEMLP(plan, gate, up, down, F.silu, oracle="expert-var")
    xt = x[:40]
    norms = torch.stack([moe._expert(e, xt).norm(dim=-1) for e in range(8)], -1)
    chosen = moe._variable_oracle(xt)
    counts = chosen.sum(1)
    assert chosen.sum() == 40 * 2 and counts.min() < 2 < counts.max()      # 2 per token on average, not each
    # the pairs kept are the 80 largest norms of the call
    assert torch.equal(norms[chosen].sort().values, torch.topk(norms.reshape(-1), 80).values.sort().values)
    want = sum(moe._expert(e, xt) * chosen[:, e:e + 1] for e in range(8))
    assert torch.allclose(moe(xt), want, rtol=1e-5, atol=1e-4)
    # more of the output norm is kept than with two experts for every token
    assert norms[chosen].sum() > torch.topk(norms, 2).values.sum()
    # neurons: the 40 x 16 largest |h_i| * ||W_down[:, i]|| of the call
    moe.oracle = "neuron-var"
    h = F.silu(xt @ gate.t()) * (xt @ up.t())
    keep = torch.topk((h.abs() * down.norm(dim=0)).reshape(-1), 40 * 16).indices
    mask = torch.zeros(h.numel()).scatter_(0, keep, 1.0).view_as(h)
    assert torch.allclose(moe(xt), (h * mask) @ down.t(), rtol=1e-4, atol=1e-4)
    assert mask.sum(1).min() < 16 < mask.sum(1).max()


@pytest.mark.parametrize("split,router", [("param", "similarity"), ("coact", "mlp")])
def test_all_experts_active_reproduces_dense(tiny_models, split, router):
    ckpt = Checkpoint(tiny_models["qwen2"])
    adapter = adapter_for(ckpt.config)
    model, _ = load_dense(ckpt, tokenizer=False)
    ids = torch.randint(0, ckpt.config["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    dense = logits_fn(model)(ids)
    opts = MethodOptions(experts=4, top_k=4, calib=CALIB, calib_samples=2, calib_seqlen=48,
                         own=MoEficationOptions(split=split, router=router))
    import gguf_moeify.calibration as cal   # the tiny SentencePiece tokenizer needs protobuf: random tokens
    orig = cal.calib_tokens
    cal.calib_tokens = lambda *a, **k: torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    try:
        plans = make_plans(ckpt, adapter, "moefication", opts, progress=False)
    finally:
        cal.calib_tokens = orig
    assert plans[0].router.kind == ("linear" if router == "similarity" else "mlp")
    moeify_(model, adapter, plans)
    moe = logits_fn(model)(ids)
    assert ((moe - dense).abs().max() / dense.abs().max()).item() < 1e-5


def test_gguf_has_mlp_router(tiny_models, tmp_path):
    opts = MethodOptions(experts=4, shared=1, top_k=1, calib=CALIB, calib_samples=2, calib_seqlen=48,
                         own=MoEficationOptions(split="param", router="mlp"))
    out = convert(str(tiny_models["llama"]), tmp_path / "m.gguf", "moefication", opts, outtype="f32",
                  progress=False)
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    assert tuple(t["blk.0.ffn_gate_inp.weight"].shape) == (64, 3)
    assert tuple(t["blk.0.ffn_gate_inp.bias"].shape) == (3,)
    # the output layer scores 3 routed experts, after the shared one written as expert 0 (zero row and bias)
    assert tuple(t["blk.1.ffn_gate_inp_out.weight"].shape) == (3, 4)
    assert tuple(t["blk.1.ffn_gate_inp_out.bias"].shape) == (4,)
    assert not np.asarray(t["blk.1.ffn_gate_inp_out.weight"].data)[0].any()
    assert not np.asarray(t["blk.1.ffn_gate_inp_out.bias"].data)[0]
