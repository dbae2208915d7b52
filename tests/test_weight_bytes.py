"""Bytes per token projected from a model's shape (``weight_bytes.token_bytes``) against the bytes counted in files the
converter writes: dense and finegrained, q8_0 and q4_0, tied and untied embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import calib_text_path, make_tiny_model
from gguf_moeify.adapters import adapter_for
from gguf_moeify.bench.files import dense_gguf
from gguf_moeify.checkpoint import Checkpoint
from gguf_moeify.convert import make_plans, write_model_file
from gguf_moeify.methods import MethodOptions
from gguf_moeify.plan import ModelPlan
from gguf_moeify.sizing import expert_layout
from gguf_moeify.weight_bytes import ModelShape, bytes_per_token, matrix_bytes, token_bytes


@pytest.fixture(scope="module")
def models(smollm2_dir, tmp_path_factory) -> dict[bool, Path]:
    """Tiny llama models with d_ff 1024 (32-neuron finegrained experts), untied and tied embeddings."""
    root = tmp_path_factory.mktemp("weight_bytes")
    return {tied: make_tiny_model("llama", root / f"tied{tied}", smollm2_dir, intermediate_size=1024,
                                  tie_word_embeddings=tied) for tied in (False, True)}


def _same_parts(projected: dict, counted: dict) -> None:
    for part in ("total", "file_bytes", "embedding_row", "output", "attention", "router", "experts_active",
                 "experts_all", "dense_ffn", "norms"):
        assert projected[part] == counted[part], part


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_projected_bytes_equal_the_written_files(models, tmp_path, tied, outtype):
    ckpt = Checkpoint(models[tied])
    adapter = adapter_for(ckpt.config)
    shape = ModelShape.from_config(json.loads((models[tied] / "config.json").read_text()))
    assert shape.tied == tied and shape.n_ff == 1024
    n_exp, shared, top_k = expert_layout("finegrained", shape.n_ff, 0.5)
    opts = MethodOptions(experts=n_exp, shared=shared, top_k=top_k, calib=str(calib_text_path()), calib_samples=2,
                         calib_seqlen=64)
    plans = ModelPlan.build(make_plans(ckpt, adapter, "finegrained", opts, progress=False))
    moe = write_model_file(ckpt, adapter, plans, tmp_path / "moe.gguf", outtype, progress=False)
    projected = token_bytes(shape, outtype, 0.5)
    assert projected["layout"] == f"S{shared}A{top_k}E{n_exp}" and projected["experts_active"] > 0
    _same_parts(projected, bytes_per_token(moe))
    assert projected["total"] < token_bytes(shape, outtype)["total"]
    assert token_bytes(shape, outtype, 0.5, router_dtype="f16")["router"] * 2 == projected["router"]


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_0"])
def test_projected_dense_bytes_equal_the_bench_reference(tools, models, tmp_path, outtype):
    """The dense reference ``bench`` makes with llama.cpp's converter (+ llama-quantize): the same bytes, except
    that its untied q4_0 token embedding is q8_0 (one row a token)."""
    shape = ModelShape.from_config(json.loads((models[False] / "config.json").read_text()))
    dense, _ = dense_gguf(str(models[False]), outtype, tmp_path, tools)
    projected, counted = token_bytes(shape, outtype), bytes_per_token(dense)
    for part in ("output", "attention", "dense_ffn", "norms", "router", "experts_all"):
        assert projected[part] == counted[part], part
    row = {"q4_0": (shape.n_embd // 32 * 18, shape.n_embd // 32 * 34)}.get(outtype)
    if row:
        assert (projected["embedding_row"], counted["embedding_row"]) == row
    else:
        assert projected["embedding_row"] == counted["embedding_row"]
    assert projected["total"] - projected["embedding_row"] == counted["total"] - counted["embedding_row"]


def test_rows_shorter_than_a_block_fall_back_to_f16():
    assert matrix_bytes(10, 16, "q4_0") == 10 * 16 * 2          # f16
    assert matrix_bytes(10, 64, "q4_0") == 10 * 2 * 18          # two q4_0 blocks of 18 bytes a row
    assert matrix_bytes(10, 64, "q8_0") == 10 * 2 * 34


def test_shape_from_a_multimodal_config_and_defaults():
    cfg = {"text_config": {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                           "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
                           "tie_word_embeddings": True}}
    s = ModelShape.from_config(cfg, "g")
    assert (s.head_dim, s.n_head_kv, s.tied) == (256, 1, True)
    s = ModelShape.from_config({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "vocab_size": 100})
    assert (s.head_dim, s.n_head_kv, s.tied) == (16, 4, False)
