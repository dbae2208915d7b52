"""The written GGUF, read back with gguf-py: tensors, shapes, types, MoE keys, determinism, and the non-MLP
tensors byte-identical to llama.cpp's own converter's dense output."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from gguf_moeify.convert import convert
from gguf_moeify.llama_cpp_source import llama_cpp_source
from gguf_moeify.methods import MethodOptions

from conftest import ARCHS

T = gguf.GGMLQuantizationType
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items()}


def _expected_names(arch: str, n_layers: int, shared_as_experts: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if arch != "gemma3" else set())
    per = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate_inp",
           "ffn_gate_up_exps", "ffn_down_exps"]
    if arch in ("qwen3", "gemma3"):
        per += ["attn_q_norm", "attn_k_norm"]
    if arch == "gemma3":   # the norms on the attention and MLP outputs; the output projection is tied
        per += ["post_attention_norm", "post_ffw_norm"]
    for i in range(n_layers):
        names |= {f"blk.{i}.{p}.weight" for p in per}
        if shared_as_experts:
            names.add(f"blk.{i}.exp_probs_b.bias")
        if arch == "qwen2":
            names |= {f"blk.{i}.attn_{x}.bias" for x in "qkv"}
    return names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_layout_keys_and_types(tiny_models, tmp_path, arch, outtype):
    out = tmp_path / "moe.gguf"
    convert(str(tiny_models[arch]), out, "mlpmoe", MethodOptions(experts=4, shared=1), outtype, progress=False)
    r = gguf.GGUFReader(out)
    f = _fields(r)
    ga = GGUF_ARCH[arch]
    assert f["general.architecture"] == ga
    # 3 routed experts + the shared one as an always-selected expert (same width)
    assert f[f"{ga}.expert_count"] == 4 and f[f"{ga}.expert_used_count"] == 4
    assert f[f"{ga}.expert_feed_forward_length"] == 64
    assert f[f"{ga}.expert_shared_feed_forward_length"] == 0 and f["gguf_moeify.always_selected_experts"] == 1
    assert f[f"{ga}.expert_weights_unit"] is True and f[f"{ga}.expert_router_type"] == 0
    assert f[f"{ga}.block_count"] == 2 and f[f"{ga}.embedding_length"] == 64
    if arch in ("llama", "mistral"):   # SmolLM2's BPE tokenizer, identified by llama.cpp's converter
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
        assert len(f["tokenizer.ggml.tokens"]) == 49152 and len(f["tokenizer.ggml.merges"]) == 48900
    else:                              # the SentencePiece tokenizer of the qwen and gemma test models
        assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.scores"]) == 512
    if arch == "gemma3":               # the converter's Gemma 3 keys, kept
        assert f["gemma3.attention.sliding_window"] == 32 and f["gemma3.attention.key_length"] == 16
    assert '"method": "mlpmoe"' in f["gguf_moeify.provenance"]
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == _expected_names(arch, 2, shared_as_experts=True)
    shape = lambda n: tuple(int(x) for x in reversed(tensors[n].shape))  # noqa: E731  numpy order
    assert shape("blk.0.ffn_gate_inp.weight") == (4, 64) and shape("blk.0.exp_probs_b.bias") == (4,)
    assert shape("blk.1.ffn_gate_up_exps.weight") == (4, 128, 64)
    assert shape("blk.1.ffn_down_exps.weight") == (4, 64, 64)
    want = T.F32 if outtype == "f32" else T.Q8_0
    assert tensors["blk.0.ffn_gate_up_exps.weight"].tensor_type == want
    assert tensors["blk.0.attn_q.weight"].tensor_type == want
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32


def test_second_run_is_byte_identical(tiny_models, tmp_path):
    digests = []
    for name in ("a.gguf", "b.gguf"):
        convert(str(tiny_models["qwen2"]), tmp_path / name, "mlpmoe", MethodOptions(experts=8), "q4_0",
                progress=False)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf"]   # no temporary files left behind


def test_expert_tensors_hold_the_dense_neurons(tiny_models, tmp_path):
    """f32 expert slices are exactly the dense rows/columns the plan names: in ffn_gate_up_exps each expert's 64 gate
    rows, then its 64 up rows."""
    from safetensors.numpy import load_file
    out = tmp_path / "moe.gguf"
    convert(str(tiny_models["llama"]), out, "mlpmoe", MethodOptions(experts=4), "f32", progress=False)
    hf = load_file(tiny_models["llama"] / "model.safetensors")
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(out).tensors}
    gate = hf["model.layers.1.mlp.gate_proj.weight"]
    up = hf["model.layers.1.mlp.up_proj.weight"]
    down = hf["model.layers.1.mlp.down_proj.weight"]
    gate_up = t["blk.1.ffn_gate_up_exps.weight"].reshape(4, 128, 64)
    assert np.array_equal(gate_up[:, :64], gate.reshape(4, 64, 64))
    assert np.array_equal(gate_up[:, 64:], up.reshape(4, 64, 64))
    assert np.array_equal(t["blk.1.ffn_down_exps.weight"][2], down[:, 128:192])


def test_shared_expert_written_as_always_selected_experts(tiny_models, tmp_path):
    """MLPMoE E=8 (d_ff 256: slices of 32) with 2 shared slices: the 64 shared neurons are experts 0-1 of the routed
    tensors, with zero router rows and a selection bias of 2^100; the 6 routed experts follow unchanged."""
    from safetensors.numpy import load_file
    out = tmp_path / "moe.gguf"
    convert(str(tiny_models["llama"]), out, "mlpmoe", MethodOptions(experts=8, shared=2, top_k=3), "f32",
            progress=False)
    r = gguf.GGUFReader(out)
    f = _fields(r)
    assert f["llama.expert_count"] == 8 and f["llama.expert_used_count"] == 5
    assert f["llama.expert_shared_feed_forward_length"] == 0 and f["gguf_moeify.always_selected_experts"] == 2
    plan = json.loads(f["gguf_moeify.plan"])[1]   # the plan itself is unchanged
    assert plan["experts"] == 6 and plan["top_k"] == 3 and plan["shared_width"] == 64
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    assert not any("shexp" in n for n in t)
    assert np.array_equal(t["blk.1.exp_probs_b.bias"], np.array([2.0 ** 100] * 2 + [0.0] * 6, np.float32))
    router = t["blk.1.ffn_gate_inp.weight"]
    assert router.shape == (8, 64) and not router[:2].any() and router[2:].any()
    hf = load_file(tiny_models["llama"] / "model.safetensors")
    gate, up, down = (hf[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    gate_up, down_exps = t["blk.1.ffn_gate_up_exps.weight"], t["blk.1.ffn_down_exps.weight"]
    assert gate_up.shape == (8, 64, 64) and down_exps.shape == (8, 64, 32)
    shared_gate, shared_up = gate_up[:2, :32].reshape(64, 64), gate_up[:2, 32:].reshape(64, 64)
    shared_down = down_exps[:2].transpose(1, 0, 2).reshape(64, 64)
    # the shared neurons are some 64 of the 256: the same ones, in the same order, in gate, up and down
    idx = [int(np.flatnonzero((gate == row).all(axis=1))[0]) for row in shared_gate]
    assert len(set(idx)) == 64
    assert np.array_equal(shared_up, up[idx]) and np.array_equal(shared_down, down[:, idx])
    from gguf_moeify.inspect_gguf import inspect_gguf
    assert "the shared expert: the first 2 experts" in inspect_gguf(str(out))
    # --shared-layout separate: the plan's own layout, the shared expert in its own tensors
    sep = tmp_path / "sep.gguf"
    convert(str(tiny_models["llama"]), sep, "mlpmoe", MethodOptions(experts=8, shared=2, top_k=3,
            shared_layout="separate"), "f32", progress=False)
    r = gguf.GGUFReader(sep)
    f, t = _fields(r), {x.name: np.asarray(x.data) for x in r.tensors}
    assert f["llama.expert_count"] == 6 and f["llama.expert_used_count"] == 3
    assert f["llama.expert_shared_feed_forward_length"] == 64 and "gguf_moeify.always_selected_experts" not in f
    assert "blk.1.exp_probs_b.bias" not in t and np.array_equal(t["blk.1.ffn_gate_shexp.weight"], shared_gate)


def test_shared_as_experts_only_when_the_widths_divide():
    from gguf_moeify.plan import ModelPlan, MoEPlan, Router

    def plans(*layers, gating="unit", layout="experts"):
        router = Router("linear", {"weight": np.zeros((4, 8))})
        target = "patched" if gating == "unit" else "stock-deepseek"
        return ModelPlan([MoEPlan(i, 1024, np.arange(4 * width).reshape(4, width), 2, router,
                                  shared=np.arange(512, 512 + shared), gating=gating)
                          for i, (width, shared) in enumerate(layers)], target, layout)
    assert plans((32, 96), (32, 96)).n_shared_as_experts() == 3
    assert plans((32, 96), (32, 96), layout="separate").n_shared_as_experts() == 0   # asked to keep it apart
    assert plans((32, 0)).n_shared_as_experts() == 0                         # no shared expert
    assert plans((64, 96)).n_shared_as_experts() == 0                        # 96 is not a multiple of 64
    assert plans((32, 64), (64, 64)).n_shared_as_experts() == 0              # 2 experts in one layer, 1 in the next
    assert plans((32, 64), gating="softmax").n_shared_as_experts() == 0      # --runtime stock keeps its own layout


def test_model_plan_refuses_what_one_file_cannot_hold():
    from gguf_moeify.plan import ModelPlan, MoEPlan, Router

    def layer(i, n_exp=4, width=8, gating="unit", dtype="f32"):
        router = Router("linear", {"weight": np.ones((n_exp, 8)) / 3}, dtype)
        return MoEPlan(i, 64, np.arange(n_exp * width).reshape(n_exp, width), 2, router, gating=gating)
    ModelPlan([layer(0), layer(1, width=4)])                  # per-layer expert widths: the patched runtime reads them
    for layers, target, match in (([layer(0), layer(1, n_exp=8)], "patched", "different expert layout"),
                                  ([layer(0, gating="softmax"), layer(1, width=4, gating="softmax")], "stock-llama",
                                   "different expert layout"),
                                  ([layer(0), layer(0)], "patched", "is for layer 0"),
                                  ([layer(0)], "stock-llama", "unit gating"),
                                  ([layer(0, dtype="f16")], "patched", "router dtype")):
        with pytest.raises(ValueError, match=match):
            ModelPlan(layers, target)
    built = ModelPlan.build([layer(0)], router_dtype="f16")   # rounds the routers, returns new plans
    assert built[0].router.dtype == "f16" and built[0].router.tensors["weight"][0, 0] == np.float16(1 / 3)
    with pytest.raises(Exception):
        built[0].top_k = 1                                    # frozen: a change is a new plan


@pytest.mark.parametrize("arch", ARCHS)
def test_non_mlp_tensors_match_llama_cpp_converter(tiny_models, tmp_path, arch):
    """Attention, norms and embeddings are laid out exactly as llama.cpp's converter lays out the dense model
    (for qwen2 we write the llama architecture, so Q/K are compared after the llama rope permutation)."""
    _compare_non_mlp_with_converter(tiny_models[arch], tmp_path, arch)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gemma3_norms_of_half_precision_checkpoints_match_the_converter(tiny_models, tmp_path, dtype):
    """Gemma's norms are stored as w + 1: the converter adds in f16 for an f16 checkpoint (rounding there) and in
    f32 for bf16 (upcast first); the written norms are the same bits either way."""
    import shutil
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma3"], dtype=getattr(torch, dtype))
    half = tmp_path / dtype
    model.save_pretrained(half, safe_serialization=True)
    shutil.copy(tiny_models["gemma3"] / "tokenizer.model", half / "tokenizer.model")
    _compare_non_mlp_with_converter(half, tmp_path, "gemma3")


def test_llama3_rope_scaling_is_written_as_the_converter_does(smollm2_dir, tmp_path):
    from conftest import make_tiny_model
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}   # short, so all three bands occur at head_dim 16
    model = make_tiny_model("llama", tmp_path / "llama3", smollm2_dir, rope_scaling=scaling)
    names = _compare_non_mlp_with_converter(model, tmp_path, "llama")
    assert "rope_freqs.weight" in names


def _compare_non_mlp_with_converter(model_dir, tmp_path, arch) -> list[str]:
    src = llama_cpp_source()
    ref = tmp_path / "dense.gguf"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                    "--outfile", str(ref)], check=True, capture_output=True, env=env)
    out = tmp_path / "moe.gguf"
    convert(str(model_dir), out, "mlpmoe", MethodOptions(experts=2), "f32", progress=False)
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    theirs = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(ref).tensors}
    common = [n for n in theirs if not n.split(".")[-2].startswith("ffn_") or n.endswith("ffn_norm.weight")]
    assert len(common) >= 2 + 2 * 6
    for name in common:
        a, b = ours[name], theirs[name]
        if arch == "qwen2" and name.split(".")[-2] in ("attn_q", "attn_k"):
            from gguf_moeify.rope_layout import permute_qk
            heads = 4 if "attn_q" in name else 2
            b = permute_qk(b, heads)
        assert a.shape == b.shape and np.array_equal(a, b), name
    return common
