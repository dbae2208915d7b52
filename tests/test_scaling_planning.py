"""The cheaper forms used at scale give what the direct forms give: expert output norms from m x m Gram matrices,
the chunked ridge normal equations, the masked dense propagation of narrow experts; and the phase timer (a no-op
unless asked for)."""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from gguf_moeify import timing
from gguf_moeify.linalg import ridge_least_squares
from gguf_moeify.methods.finegrained import activations, expert_output_norms


def test_expert_norms_from_gram_matrices_equal_the_explicit_outputs():
    g = torch.Generator().manual_seed(0)
    d, d_ff, T = 24, 96, 300
    gate, up = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g)
    down = torch.randn(d, d_ff, generator=g)
    x = torch.randn(T, d, generator=g)
    experts = np.random.default_rng(0).permutation(d_ff)[:80].reshape(10, 8)
    h = activations(x, gate, up, F.silu)
    explicit = torch.stack([(h[:, e] @ down[:, e].t()).norm(dim=1) for e in map(torch.as_tensor, experts)], 1)
    assert torch.allclose(expert_output_norms(x, gate, up, down, experts, F.silu), explicit, rtol=1e-5, atol=1e-5)


def test_chunked_ridge_equals_the_one_shot_float64_solution(monkeypatch):
    import gguf_moeify.linalg as linalg
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 16, generator=g), torch.randn(1000, 5, generator=g)
    xd, yd = x.double(), y.double()
    gram = xd.t() @ xd
    lam = 1e-3 * gram.diagonal().mean()
    direct = torch.linalg.solve(gram + lam * torch.eye(16, dtype=torch.float64), xd.t() @ yd).t().float().numpy()
    monkeypatch.setattr(linalg, "GRAM_CHUNK", 128)           # several chunks, one of them partial
    assert np.allclose(ridge_least_squares(x, y), direct, rtol=1e-6, atol=1e-7)


def test_phase_timer_records_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    with timing.phase("statistics"):
        pass
    timing.record(layer=0)                                     # off: nothing written, nothing kept
    out = tmp_path / "t.jsonl"
    monkeypatch.setenv(timing.ENV, str(out))
    for layer in range(2):
        with timing.phase("plan"):
            with timing.phase("statistics"):
                torch.ones(10).sum()
        timing.record(layer=layer)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["layer"] for x in lines] == [0, 1]
    assert all(x["plan"] >= x["statistics"] >= 0 and "plan_cpu" in x and x["max_rss_mib"] > 0 for x in lines)


def test_masked_dense_propagation_equals_the_moe_forward():
    """calibration.moe_forward's dense form for narrow experts gives MoEMLP's output (chosen experts + shared)."""
    from gguf_moeify.calibration import LayerCalib, moe_forward
    from gguf_moeify.methods import MethodOptions
    from gguf_moeify.methods.finegrained import plan_layer
    from gguf_moeify.moe_torch import MoEMLP
    g = torch.Generator().manual_seed(2)
    d, d_ff = 16, 128
    gate, up = torch.randn(d_ff, d, generator=g), torch.randn(d_ff, d, generator=g)
    down, x = torch.randn(d, d_ff, generator=g), torch.randn(400, d, generator=g)
    plan = plan_layer(0, gate, up, down, MethodOptions(experts=16, shared=3, top_k=5), LayerCalib(x=x, act=F.silu))
    moe = MoEMLP(plan, gate, up, down, F.silu)
    forward = moe_forward(moe)
    assert forward is not moe                                   # 8-neuron experts: the dense form
    ref = moe(x)
    assert torch.allclose(forward(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
