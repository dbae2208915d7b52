"""Calibration through the weights as a q8_0 / q4_0 file stores them (per-token expert counts): what calibration
computes with is what the writer puts in the file, the hidden states flow through those weights, and the per-token
thresholds then hold on them."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import calib_text_path, make_tiny_model
from gguf_moeify.adapters import adapter_for
from gguf_moeify.calibration import LayerwiseModel, calib_tokens, calibrated_plans
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import calibrated_for_outtype, make_plans, provenance, write_model_file
from gguf_moeify.errors import UserError
from gguf_moeify.methods import FinegrainedOptions, MethodOptions, get_method
from gguf_moeify.moe_torch import MoEMLP, experts_used_by_layer
from gguf_moeify.plan import ModelPlan
from gguf_moeify.reference import load_dense, moeify_
from gguf_moeify.stored_weights import (as_stored, embedding_outtype, embedding_tied, experts_as_stored_,
                                        head_outtype, layer_matrices)

PER_TOKEN = FinegrainedOptions(expert_counts="per-token")


def _opts(**kw) -> MethodOptions:
    base = dict(experts=32, shared=4, top_k=6, calib=str(calib_text_path()), calib_samples=4, calib_seqlen=64,
                own=PER_TOKEN)
    return MethodOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def wide_models(smollm2_dir, tmp_path_factory) -> dict[bool, Path]:
    """Tiny llama models with 32-neuron experts at E = 32 (d_ff 1024), untied and tied embeddings."""
    root = tmp_path_factory.mktemp("wide")
    return {tied: make_tiny_model("llama", root / f"tied{tied}", smollm2_dir, intermediate_size=1024,
                                  tie_word_embeddings=tied) for tied in (False, True)}


def _file_tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def test_round_trip_is_gguf_py_and_the_f16_fallback():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for kind in ("q8_0", "q4_0"):
        qt = getattr(gguf.GGMLQuantizationType, kind.upper())
        want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)
        got = as_stored(w, kind)
        assert np.array_equal(got.numpy(), want) and not torch.equal(got, w)
    narrow = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))   # not a whole block: f16 in the file
    assert torch.equal(as_stored(narrow, "q4_0"), narrow.half().float())
    assert torch.equal(as_stored(w, "f32"), w) and head_outtype("q4_0") == "q8_0" and head_outtype("q8_0") == "q8_0"


@pytest.mark.parametrize("tied", [False, True])
def test_calibration_computes_with_what_the_file_holds(wide_models, tmp_path, tied):
    """The q4_0 file's embedding, attention and expert tensors, dequantized, are the ones calibration uses."""
    ckpt = Checkpoint(wide_models[tied])
    adapter = adapter_for(ckpt.config)
    assert embedding_tied(ckpt, adapter) == tied
    opts = _opts(calib_outtype="q4_0")
    plans = ModelPlan.build(make_plans(ckpt, adapter, "finegrained", opts, progress=False))
    assert plans.n_shared_as_experts() == 4
    out = tmp_path / "moe.gguf"
    write_model_file(ckpt, adapter, plans, out, "q4_0", provenance(ckpt, "finegrained", opts, "q4_0", "float32"),
                     progress=False)
    reader = gguf.GGUFReader(out)
    lm = LayerwiseModel(ckpt, adapter)
    ids = torch.arange(ckpt.config["vocab_size"])
    assert np.array_equal(_file_tensor(reader, "token_embd.weight"), lm.embed(ids, "q4_0").numpy())
    layer = lm.layer(1, "q4_0")
    for hf, gg in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output")):
        assert np.array_equal(_file_tensor(reader, f"blk.1.{gg}.weight"), layer.get_submodule(hf).weight.detach().numpy())
    gate, up, down = (ckpt.get(n) for n in adapter.mlp_names(1))
    moe = MoEMLP(plans.layers[1], gate, up, down, act=adapter.act)
    before = moe.down_exps.clone()
    experts_as_stored_(moe, "q4_0", 32, shared_as_experts=True)
    assert not torch.equal(moe.down_exps, before)
    gate_up, down_exps = _file_tensor(reader, "blk.1.ffn_gate_up_exps.weight"), _file_tensor(
        reader, "blk.1.ffn_down_exps.weight")                                      # (4 + 28, 64, d), (4 + 28, d, 32)
    assert np.array_equal(gate_up[4:, :32], moe.gate_exps.numpy()) and np.array_equal(gate_up[4:, 32:],
                                                                                       moe.up_exps.numpy())
    assert np.array_equal(down_exps[4:], moe.down_exps.numpy())
    assert np.array_equal(gate_up[:4, :32].reshape(128, -1), moe.gate_shexp.numpy())
    assert np.array_equal(down_exps[:4].transpose(1, 0, 2).reshape(ckpt.n_embd, 128), moe.down_shexp.numpy())


def _stored_reference(ckpt, adapter, plans, outtype):
    """The torch reference with every weight as a file of ``outtype`` stores it."""
    model, _ = load_dense(ckpt, tokenizer=False)
    emb = model.get_input_embeddings()
    emb.weight.data = as_stored(emb.weight.data, embedding_outtype(ckpt, adapter, outtype))
    for i in range(ckpt.n_layers):
        for mod in layer_matrices(adapter):
            lin = model.get_submodule(adapter.layer_prefix.format(i=i) + mod)
            lin.weight.data = as_stored(lin.weight.data, outtype)
    moeify_(model, adapter, plans)
    for m in model.modules():
        if isinstance(m, MoEMLP):
            experts_as_stored_(m, outtype, m.plan.expert_width, m.plan.shared_width > 0)
    return model


def test_hidden_states_flow_through_stored_weights_and_thresholds_hold_there(wide_models):
    """With calib_outtype the states captured before each layer are those of the reference whose weights are the
    file's (not the source's), and the per-token thresholds give the calibration tokens top-k experts on average
    on that model; thresholds set on the source weights miss that mean by more."""
    ckpt = Checkpoint(wide_models[True])
    adapter = adapter_for(ckpt.config)
    ids = calib_tokens(ckpt, str(calib_text_path()), 4, 64, seed=0)
    captured: list[torch.Tensor] = []
    plans = calibrated_plans(ckpt, adapter, get_method("finegrained"), _opts(calib_outtype="q4_0"), progress=False,
                             capture=captured)
    plain = calibrated_plans(ckpt, adapter, get_method("finegrained"), _opts(), progress=False)
    stored = _stored_reference(ckpt, adapter, plans, "q4_0")
    with torch.no_grad():
        ref = stored(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(ckpt.n_layers):
        assert (captured[i] - ref[i]).abs().max() < 1e-4
    source, _ = load_dense(ckpt, tokenizer=False)
    with torch.no_grad():
        assert (captured[0] - source(input_ids=ids, output_hidden_states=True).hidden_states[0]).abs().max() > 1e-3
    used = experts_used_by_layer(stored)
    plain_model = _stored_reference(ckpt, adapter, plain, "q4_0")
    with torch.no_grad():
        plain_model(input_ids=ids)
    used_plain = experts_used_by_layer(plain_model)
    print(f"mean experts on the q4_0 weights: calibrated through them {used}, through the source {used_plain}")
    assert all(u == pytest.approx(6.0, abs=0.02) for u in used)
    assert max(abs(u - 6.0) for u in used_plain) > max(abs(u - 6.0) for u in used)


def test_only_per_token_counts_of_quantized_files_calibrate_through_stored_weights():
    fixed = _opts(own=FinegrainedOptions())
    assert calibrated_for_outtype("finegrained", _opts(), "q4_0").calib_outtype == "q4_0"
    assert calibrated_for_outtype("finegrained", _opts(), "q8_0").calib_outtype == "q8_0"
    for method, opts, outtype in (("finegrained", _opts(), "f16"), ("finegrained", _opts(), "q4_k_m"),
                                  ("finegrained", fixed, "q4_0"), ("cmoe", MethodOptions(calib="bundled"), "q4_0")):
        assert calibrated_for_outtype(method, opts, outtype).calib_outtype is None


def test_calib_outtype_is_checked(wide_models):
    ckpt = Checkpoint(wide_models[False])
    with pytest.raises(UserError, match="q8_0 or q4_0"):
        make_plans(ckpt, adapter_for(ckpt.config), "finegrained", _opts(calib_outtype="q4_k_m"), progress=False)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_stored_weight_propagation_for_other_architectures(tiny_models, arch, monkeypatch):
    """Qwen3 (q/k norms, which stay f32) and Gemma 3 (scaled tied embedding, post-norms, GELU): the captured states
    are the reference's with the file's weights. Their tiny experts are 8 neurons wide: down rows fall back to f16."""
    ckpt = Checkpoint(tiny_models[arch])
    adapter = adapter_for(ckpt.config)
    ids = torch.randint(0, ckpt.config["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("gguf_moeify.calibration.calib_tokens", lambda *a, **k: ids)
    captured: list[torch.Tensor] = []
    opts = _opts(calib_outtype="q4_0", calib_samples=2, calib_seqlen=48)
    plans = calibrated_plans(ckpt, adapter, get_method("finegrained"), opts, progress=False, capture=captured)
    stored = _stored_reference(ckpt, adapter, plans, "q4_0")
    source, _ = load_dense(ckpt, tokenizer=False)
    moeify_(source, adapter, plans)                      # the same plans on the source weights
    with torch.no_grad():
        ref = stored(input_ids=ids, output_hidden_states=True).hidden_states
        plain = source(input_ids=ids, output_hidden_states=True).hidden_states
    tol = 2e-4 if arch == "gemma3" else 1e-4   # Gemma's GELU through ggml's f16 table (test_calibration.py)
    for i in range(ckpt.n_layers):
        assert (captured[i] - ref[i]).abs().max() < tol
        assert (captured[i] - plain[i]).abs().max() > 10 * tol
