"""Exactness of the torch reference: MLPMoE slicing reproduces the dense model, for every architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.adapters import adapter_for
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import make_plans
from gguf_moeify.methods import MethodOptions, MLPMoEOptions
from gguf_moeify.moe_torch import MoEMLP
from gguf_moeify.plan import MoEPlan, Router
from gguf_moeify.reference import load_dense, logits_fn, moeify_

from conftest import ARCHS


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("experts,shared", [(4, 0), (8, 2)])
def test_mlpmoe_slice_matches_dense(tiny_models, arch, experts, shared):
    ckpt = Checkpoint(tiny_models[arch])
    adapter = adapter_for(ckpt.config)
    model, _ = load_dense(ckpt, tokenizer=False)
    ids = torch.randint(0, ckpt.config["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    dense = logits_fn(model)(ids)
    plans = make_plans(ckpt, adapter, "mlpmoe", MethodOptions(experts=experts, shared=shared), progress=False)
    moeify_(model, adapter, plans)
    assert isinstance(model.model.layers[0].mlp, MoEMLP)
    moe = logits_fn(model)(ids)
    assert _rel_err(moe, dense) < 1e-5


def test_routing_selects_top_k_by_score():
    """Top-k < E: only the chosen experts contribute, each with weight 1, plus the shared expert."""
    torch.manual_seed(0)
    d, d_ff = 16, 64
    gate, up, down = torch.randn(d_ff, d), torch.randn(d_ff, d), torch.randn(d, d_ff)
    experts = np.arange(8, d_ff).reshape(4, 14)
    router = np.random.default_rng(0).standard_normal((4, d)).astype(np.float32)
    plan = MoEPlan(layer=0, d_ff=d_ff, experts=experts, top_k=2, router=Router("linear", {"weight": router}),
                   shared=np.arange(8))
    moe = MoEMLP(plan, gate, up, down, F.silu)
    x = torch.randn(5, d)
    chosen = torch.topk(x @ torch.as_tensor(router).t(), 2).indices
    for t in range(5):
        neurons = np.concatenate([np.arange(8)] + [experts[e] for e in chosen[t].tolist()])
        n = torch.as_tensor(neurons)
        want = down[:, n] @ (torch.nn.functional.silu(gate[n] @ x[t]) * (up[n] @ x[t]))
        # float32 rounding scales with the output's magnitude (~100 here): summation order differs by CPU
        assert torch.allclose(moe(x[t:t + 1])[0], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("variant", ["fractal-fade", "compensated-pruning"])
def test_mlpmoe_variants_are_deterministic_and_reduce(tiny_models, variant):
    ckpt = Checkpoint(tiny_models["llama"])
    adapter = adapter_for(ckpt.config)
    opts = MethodOptions(experts=4, own=MLPMoEOptions(variant=variant, keep=0.5))
    a = make_plans(ckpt, adapter, "mlpmoe", opts, progress=False)
    b = make_plans(ckpt, adapter, "mlpmoe", opts, progress=False)
    for pa, pb in zip(a, b):
        assert np.array_equal(pa.experts, pb.experts)
        kept = pa.experts[pa.experts >= 0]
        assert len(np.unique(kept)) == len(kept)            # no neuron twice
        assert pa.info["kept_fraction"] == 0.5               # 256 * 0.5 = 4 experts x 32
        assert pa.expert_width == 32
    if variant == "compensated-pruning":
        assert all(p.neuron_scale is not None and p.info["compensation"] > 1.0 for p in a)


def test_slice_routed_baseline_router_and_variant_check():
    """mlpmoe slice with top-k < E: contiguous slices scored by their mean normalised gate row (data-free);
    the parameter-reducing variants keep every expert active and refuse a smaller top-k."""
    from gguf_moeify.errors import UserError
    from gguf_moeify.methods.mlpmoe import plan_layer, validate
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    down = torch.randn(16, 64, generator=g)
    plan = plan_layer(0, gate, up, down, MethodOptions(experts=8, shared=2, top_k=3))
    assert plan.top_k == 3 and plan.n_experts == 6 and plan.info["router"] == "slice-similarity"
    gn = torch.nn.functional.normalize(gate, dim=1)
    want = torch.stack([gn[torch.as_tensor(e)].mean(0) for e in plan.experts])
    assert np.allclose(plan.router.tensors["weight"], want.numpy(), atol=1e-6)
    assert all(np.array_equal(e, np.arange(e[0], e[0] + 8)) for e in plan.experts)   # contiguous slices
    with pytest.raises(UserError, match="keeps every expert active"):
        validate(MethodOptions(experts=8, top_k=3, own=MLPMoEOptions(variant="fractal-fade")), 64)


def test_f16_router_rounds_matrices_whenever_built():
    """Router dtype "f16": matrices hold f16 values (biases stay f32), also when assigned after a training step, and
    the scores round their inputs too (llama.cpp's CPU backend converts activations to the weights' type)."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 8)) / 3, rng.standard_normal(6) / 3 + 1e-4
    r = Router("mlp", {"w1": w1, "b1": b1, "w2": rng.standard_normal((4, 6)), "b2": rng.standard_normal(4)})
    assert np.array_equal(r.tensors["w1"], w1.astype(np.float32))
    r = r.with_dtype("f16")
    as_f16 = w1.astype(np.float16).astype(np.float32)
    assert np.array_equal(r.tensors["w1"], as_f16) and not np.array_equal(as_f16, w1.astype(np.float32))
    assert np.array_equal(r.tensors["b1"], b1.astype(np.float32))   # biases: f32, as the file stores them
    r = r.with_tensors({**r.tensors, "w1": w1})                      # e.g. after a training step
    assert np.array_equal(r.tensors["w1"], as_f16) and r.dtype == "f16"
    plan = MoEPlan(layer=0, d_ff=8, experts=np.arange(8).reshape(4, 2), top_k=2, router=r)
    d = torch.randn(8, 8) / 3
    moe = MoEMLP(plan, d, d, d, F.silu)
    x = torch.randn(5, 8) + 1 / 3
    t = {k: torch.as_tensor(v) for k, v in r.tensors.items()}
    xr = x.half().float()
    want = torch.tanh(xr @ t["w1"].t() + t["b1"]).half().float() @ t["w2"].t() + t["b2"]
    assert torch.equal(moe.scores(x), want)
