"""Per-layer budgets: the allocation is the exact optimum, the error curve is the MoE MLP's real error at each k,
and a calibrated conversion keeps the requested average while giving layers different k."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.adapters import adapter_for
from gguf_moeify.budget import allocate, error_curve
from gguf_moeify.calibration import LayerCalib
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import make_plans
from gguf_moeify.methods import FinegrainedOptions, MethodOptions
from gguf_moeify.methods.finegrained import plan_layer
from gguf_moeify.moe_torch import MoEMLP

from gguf_moeify.bundled import EVAL_EXCERPT

CALIB = str(EVAL_EXCERPT)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    curves = [np.sort(rng.random(s))[::-1] * rng.random() for s in (4, 3, 5)]
    total = 7
    ks = allocate(curves, total)
    assert sum(ks) == total and all(1 <= k <= len(c) for k, c in zip(ks, curves))
    best = min(sum(c[k - 1] for c, k in zip(curves, combo))
               for combo in itertools.product(*(range(1, len(c) + 1) for c in curves)) if sum(combo) == total)
    assert sum(c[k - 1] for c, k in zip(curves, ks)) == pytest.approx(best)


def test_allocation_moves_experts_to_the_sensitive_layer_and_rejects_impossible_budgets():
    flat = np.array([1.0, 0.9, 0.8, 0.7])
    steep = np.array([10.0, 5.0, 1.0, 0.0])
    assert allocate([flat, steep], 4) == [1, 3]
    with pytest.raises(ValueError):
        allocate([flat, steep], 9)


def test_allocation_gives_more_experts_where_the_error_falls_faster():
    """Four layers whose error falls by 4, 1, 2 and 0.5 per added expert (E_r = 7), the uniform budget k = 3 and the
    calibration's bounds [k/2, 2k] = [1, 6]: the steepest layer fills to 6, the next takes the rest (4)."""
    slopes = [4.0, 1.0, 2.0, 0.5]
    curves = [s * (7 - np.arange(1, 8, dtype=float)) for s in slopes]
    ks = allocate(curves, 4 * 3, k_min=1, k_max=6)
    assert ks == [6, 1, 4, 1]
    assert sum(ks) == 12 and all(1 <= k <= 6 for k in ks) and len(set(ks)) > 1
    by_slope = [k for _, k in sorted(zip(slopes, ks), reverse=True)]
    assert by_slope == sorted(by_slope, reverse=True)          # more experts where the error falls faster


def test_error_curve_is_the_moe_error_at_each_k():
    g = torch.Generator().manual_seed(0)
    d, d_ff, T = 16, 64, 200
    gate, up = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g)
    down, x = torch.randn(d, d_ff, generator=g) / 8, torch.randn(T, d, generator=g)
    resid = torch.randn(T, d, generator=g) * 4
    plan = plan_layer(0, gate, up, down, MethodOptions(experts=8, shared=1, top_k=3), LayerCalib(x=x, act=F.silu))
    dense = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    curve = error_curve(MoEMLP(plan, gate, up, down, F.silu), x, resid, dense)
    assert curve.shape == (7,)
    scale = float((resid + dense).pow(2).sum())
    for k in (1, 3, 7):
        direct = float((MoEMLP(replace(plan, top_k=k), gate, up, down, F.silu)(x) - dense).pow(2).sum()) / scale
        assert curve[k - 1] == pytest.approx(direct, rel=1e-4, abs=1e-9)
    assert curve[-1] < 1e-10          # every expert active: the dense MLP


def test_sensitivity_budget_keeps_the_average_with_different_k_per_layer(tiny_models):
    """A calibrated conversion at k = 3 of 7 routed experts: the layers' measured error curves differ, the layer
    whose error falls more from a 4th expert gets more experts, the average and the bounds [1, 6] hold, and the
    k are the allocation of the recorded curves."""
    ckpt = Checkpoint(tiny_models["llama"])
    opts = MethodOptions(experts=8, shared=1, top_k=3, calib=CALIB, calib_samples=2, calib_seqlen=64,
                         layer_budget="sensitivity", own=FinegrainedOptions(router_hidden=16))
    plans = make_plans(ckpt, adapter_for(ckpt.config), "finegrained", opts, progress=False)
    ks = [p.top_k for p in plans]
    curves = [np.array(p.info["budget_error_curve"]) for p in plans]
    assert all(p.info["uniform_top_k"] == 3 for p in plans) and all(c.shape == (7,) for c in curves)
    assert sum(ks) == 3 * len(plans) and all(1 <= k <= 6 for k in ks) and len(set(ks)) > 1, ks
    assert ks == allocate(curves, 3 * len(plans), k_min=1, k_max=6)
    falls = [c[2] - c[3] for c in curves]   # the error a 4th expert removes
    assert ks[int(np.argmax(falls))] == max(ks) and ks[int(np.argmin(falls))] == min(ks), (ks, falls)
