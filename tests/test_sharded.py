"""Sharded checkpoints (``model.safetensors.index.json`` + shards) convert, with an empty tokenizer-export cache:
llama.cpp's converter must never see the index without its shards."""
from __future__ import annotations

import json

import gguf

from gguf_moeify.convert import convert
from gguf_moeify.llama_cpp_source import llama_cpp_source
from gguf_moeify.methods import MethodOptions
from gguf_moeify.vocab import _vocab_dir_for_converter

from conftest import make_tiny_model


def _sharded_and_single(smollm2_dir, root):
    # same folder name: the file's general.name may come from it
    sharded = make_tiny_model("llama", root / "a" / "tiny", smollm2_dir, seed=3, shard=True)
    single = make_tiny_model("llama", root / "b" / "tiny", smollm2_dir, seed=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1      # really sharded
    assert not list(single.glob("*.index.json"))
    return sharded, single


def test_converter_view_holds_no_weights_and_no_index(smollm2_dir, tmp_path):
    sharded = make_tiny_model("llama", tmp_path / "m", smollm2_dir, shard=True)
    (tmp_path / "v").mkdir()
    view = _vocab_dir_for_converter(sharded, tmp_path / "v")
    names = sorted(p.name for p in view.iterdir())
    assert "config.json" in names and "tokenizer.json" in names
    assert not [n for n in names if n.endswith((".safetensors", ".index.json", ".bin"))], names


def test_sharded_checkpoint_converts_with_a_cold_vocab_cache(smollm2_dir, tmp_path, monkeypatch):
    sharded, single = _sharded_and_single(smollm2_dir, tmp_path)
    # an empty cache for the tokenizer export; the llama.cpp source already on this machine (no new download)
    monkeypatch.setenv("LLAMA_CPP_DIR", str(llama_cpp_source()))
    monkeypatch.setenv("GGUF_MOEIFY_CACHE", str(tmp_path / "cache"))
    opts = MethodOptions(experts=4, shared=1)
    convert(str(sharded), tmp_path / "sharded.gguf", "mlpmoe", opts, "f32", progress=False)
    assert len(list((tmp_path / "cache" / "vocab").glob("*.gguf"))) == 1     # exported now, not from a cache
    convert(str(single), tmp_path / "single.gguf", "mlpmoe", opts, "f32", progress=False)
    # the same weights in one file or in shards give the same GGUF, tokenizer keys included
    assert (tmp_path / "sharded.gguf").read_bytes() == (tmp_path / "single.gguf").read_bytes()
    fields = gguf.GGUFReader(tmp_path / "sharded.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 49152
