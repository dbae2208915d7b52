"""--runtime stock: files that unmodified llama.cpp runs, computing what the torch reference's stock mode computes.

For each architecture mapping (llama/qwen2 with a shared expert -> deepseek, without -> llama's Mixtral path,
qwen3 -> qwen3moe) and router kind, an f32 file from a tiny random model runs in the unpatched build and its
perplexity equals the torch reference (softmax gating, epsilon-scaled router, folded expert scale) on the very tokens
llama.cpp scored. The stock form stays close to the unit-gate plan it expresses.
"""
from __future__ import annotations

import math

import gguf
import pytest
import torch
import torch.nn.functional as F

from gguf_moeify.errors import UserError
from gguf_moeify.convert import make_plans
from gguf_moeify.evaluate import perplexity
from gguf_moeify.llama_cpp import relative_difference
from gguf_moeify.methods import MethodOptions
from gguf_moeify.reference import load_dense, logits_fn, moeify_
from gguf_moeify.stock import DELTA, stock_target, stockify

from gguf_moeify.bundled import EVAL_EXCERPT
from test_llama_cpp_parity import CHUNKS, CTX, _routed_plans, _torch_and_llama_cpp, _write

MAPPINGS = [("llama", 1, "deepseek"), ("llama", 0, "llama"), ("qwen2", 1, "deepseek"), ("qwen2", 0, "llama"),
            ("qwen3", 0, "qwen3moe")]


@pytest.fixture(scope="module")
def text_file(eval_excerpt):
    return eval_excerpt


def _inputs(d: int, n: int = 4000) -> torch.Tensor:
    """Stand-in calibration MLP inputs (RMS-normalised scale) for plans built without calibration text."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3))


def _stock_routed_plans(kind: str, shared: int, top_k: int = 3):
    routed = _routed_plans(kind, top_k=top_k, experts=8, shared=shared)

    def make(ckpt, adapter):
        target = stock_target(adapter.name, shared > 0)
        return [stockify(p, target, _inputs(ckpt.n_embd), F.silu) for p in routed(ckpt, adapter)]
    return make


@pytest.mark.parametrize("arch, shared, stock_arch", MAPPINGS)
@pytest.mark.parametrize("kind", ["linear", "cmoe", "mlp"])
def test_stock_file_runs_unpatched_and_matches_torch_stock_mode(stock_tools, tiny_models, text_file, tmp_path, arch,
                                                               shared, stock_arch, kind):
    out = tmp_path / "stock.gguf"
    ckpt, adapter, plans = _write(tiny_models[arch], _stock_routed_plans(kind, shared), out)
    fields = gguf.GGUFReader(out).fields
    assert fields["general.architecture"].contents() == stock_arch
    assert not any(k.endswith(("expert_weights_unit", "expert_router_type")) for k in fields)
    assert all(p.router.kind == "linear" and p.gating == "softmax" for p in plans)
    ref, cpp = _torch_and_llama_cpp(stock_tools, out, ckpt, adapter, plans, text_file, tmp_path)
    print(f"{arch} S{shared} {kind} -> {stock_arch}: torch {ref.ppl:.6f} stock llama.cpp {cpp.ppl:.6f} "
          f"agreement {plans[0].info['stock_router_agreement']}")
    assert relative_difference(ref.ppl, cpp.ppl) < 1e-3, (ref.ppl, cpp.ppl)


def _torch_ppl(ckpt, adapter, plans, tokens) -> float:
    model, _ = load_dense(ckpt, tokenizer=False)
    moeify_(model, adapter, plans)
    return perplexity(logits_fn(model), tokens, CTX, CHUNKS).ppl


@pytest.mark.parametrize("shared", [0, 1])
def test_stock_form_is_the_unit_gate_plan_within_its_bound(tiny_models, tmp_path, shared):
    """A linear-router plan and its stock form choose the same experts and weigh them within exp(+-DELTA) of 1 on
    the calibration inputs: the two torch models' perplexities agree to ~DELTA."""
    from gguf_moeify.adapters import adapter_for
    from gguf_moeify.checkpoint import Checkpoint
    ckpt = Checkpoint(tiny_models["llama"])
    adapter = adapter_for(ckpt.config)
    unit = _routed_plans("linear", top_k=3, experts=8, shared=shared)(ckpt, adapter)
    target = stock_target(adapter.name, shared > 0)
    x = _inputs(ckpt.n_embd)
    stocked = [stockify(p, target, x, F.silu) for p in unit]
    for p in stocked:
        assert p.info["stock_router_agreement"] > 0.99
        assert p.expert_scale == (3 if target.norm_weights else p.n_experts)
        # the folded weights stock llama.cpp computes on every calibration token, from the file's router matrix
        logits = x.double() @ torch.from_numpy(p.router.tensors["weight"]).double().t()
        probs = torch.softmax(logits, dim=1)
        chosen = torch.topk(probs, p.top_k, dim=1).values
        if p.norm_weights:
            chosen = chosen / chosen.sum(1, keepdim=True)
        folded = chosen * p.expert_scale
        assert folded.min() >= math.exp(-DELTA) * (1 - 1e-6) and folded.max() <= math.exp(DELTA) * (1 + 1e-6), \
            (float(folded.min()), float(folded.max()))
        # and epsilon is no smaller than it must be: the widest spread of the logits that enter the weights (the
        # chosen ones when renormalised, all otherwise) reaches DELTA on some token
        entering = torch.topk(logits, p.top_k, dim=1).values if p.norm_weights else logits
        assert float((entering.max(1).values - entering.min(1).values).max()) == pytest.approx(DELTA, rel=1e-4)
    # the oracles ignore the gating: a stock plan's ceilings are its unit-gate plan's
    from gguf_moeify.moe_torch import MoEMLP
    mlp = [ckpt.get(n) for n in adapter.mlp_names(0)]
    for mode in ("expert", "neuron"):
        a, b = (MoEMLP(p, *mlp, F.silu, oracle=mode)(x[:256]) for p in (unit[0], stocked[0]))
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), mode
    tokens = torch.randint(0, ckpt.config["vocab_size"], (CTX * CHUNKS,), generator=torch.Generator().manual_seed(0))
    a = _torch_ppl(ckpt, adapter, unit, tokens.tolist())
    b = _torch_ppl(ckpt, adapter, stocked, tokens.tolist())
    print(f"S{shared}: unit gates {a:.4f}, stock form {b:.4f}")
    assert relative_difference(a, b) < 2 * DELTA, (a, b)


def test_calibrated_cmoe_stock_file_in_unpatched_llama_cpp(stock_tools, tiny_models, text_file, tmp_path):
    """The whole path: CMoE calibrated with --runtime stock (the analytic router replaced by a fitted linear one,
    later layers calibrated on the stock form) -> deepseek file -> unpatched llama.cpp == torch."""
    opts = MethodOptions(experts=4, shared=1, top_k=1, calib=str(EVAL_EXCERPT), calib_samples=4, calib_seqlen=64, runtime="stock")
    out = tmp_path / "cmoe-stock.gguf"
    ckpt, adapter, plans = _write(tiny_models["llama"], lambda c, a: make_plans(c, a, "cmoe", opts, progress=False),
                                  out, opts)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "deepseek"
    for p in plans:
        assert p.info["stock_router_fitted"] and 0.3 < p.info["stock_router_agreement"] <= 1.0
    ref, cpp = _torch_and_llama_cpp(stock_tools, out, ckpt, adapter, plans, text_file, tmp_path)
    assert relative_difference(ref.ppl, cpp.ppl) < 1e-3, (ref.ppl, cpp.ppl)


def test_stock_errors_are_one_line(tiny_models, tmp_path, capsys):
    from gguf_moeify.cli import main
    text = str(EVAL_EXCERPT)
    cases = [
        (["--method", "cmoe", "--config", "S1A1E4", "--calib", text, "--layer-budget", "sensitivity"],
         "needs the patched runtime"),
        (["--method", "mlpmoe", "-E", "4", "-S", "1", "--top-k", "2"], "needs calibration inputs"),
        (["--method", "mlpmoe", "-E", "4", "--router-dtype", "f16"], "--router-dtype f16 needs the patched runtime"),
    ]
    for extra, message in cases:
        code = main([str(tiny_models["llama"]), str(tmp_path / "x.gguf"), "-q", "--runtime", "stock", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    code = main([str(tiny_models["gemma3"]), str(tmp_path / "x.gguf"), "-q", "--runtime", "stock", "-E", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot run a Gemma 3 MoE" in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
    with pytest.raises(UserError, match="qwen3moe has no shared expert"):
        stock_target("qwen3", True)


def test_llama3_rope_scaling_needs_the_mixtral_path():
    """Stock deepseek does not load rope_freqs: plans with a shared expert refuse llama3 scaling under either
    transformers config name; without a shared expert (llama's Mixtral path, which loads it) it is accepted."""
    from types import SimpleNamespace

    from gguf_moeify.stock import check_stock_options
    shared = SimpleNamespace(layer_budget="uniform", shared=2, router_dtype="f32")
    check_stock_options(shared, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "llama")
    for config in ({"rope_parameters": {"rope_type": "llama3"}}, {"rope_scaling": {"rope_type": "llama3"}}):
        with pytest.raises(UserError, match="llama3 rope scaling"):
            check_stock_options(shared, config, "llama")
    check_stock_options(SimpleNamespace(layer_budget="uniform", shared=0, router_dtype="f32"),
                        {"rope_scaling": {"rope_type": "llama3"}}, "llama")
