"""Per-architecture facts, as data: where the weights of a decoder layer live in the HF checkpoint, which
activation the MLP uses, and how llama.cpp wants the layer laid out (GGUF architecture, tensor names, Q/K rows).

Adding an architecture means adding one ``Adapter`` entry below; nothing else in the package names an architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .errors import UserError


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) as llama.cpp's CPU backend evaluates it (ggml_vec_gelu/geglu_f32 with GGML_GELU_FP16): the
    input rounded to f16, looked up in a table of f16 results, 0 below -10 and x above 10. It differs from exact
    GELU by f16 rounding (~5e-4 relative), enough over 18 layers to flip close routing decisions and move a routed
    file's perplexity by 3e-3 relative (Gemma-3-270M at 50% active): the reference computes what the file does."""
    table = F.gelu(x.to(torch.float16).to(torch.float32), approximate="tanh").to(torch.float16).to(x.dtype)
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, table))


# HF hidden_act -> the function of the gated MLP act(W_gate x) * (W_up x), as the torch reference and every method's
# statistics compute it; the patched llama.cpp graphs implement these (ggml_swiglu, ggml_geglu)
ACTIVATION_FNS = {"silu": F.silu, "gelu_pytorch_tanh": ggml_gelu}

# HF per-layer tensor (without ".weight"/".bias") -> GGUF per-layer tensor, shared by the llama-like families.
_LLAMA_ATTN = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
}


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]        # HF config.model_type values handled here
    gguf_arch: str                      # general.architecture of the written file (patched llama.cpp graph)
    permute_qk: bool                    # llama.cpp "normal" rope: permute Q/K rows (see rope_layout.py)
    layer_tensors: dict[str, str]       # HF per-layer module -> GGUF per-layer name (attention and norms)
    note: str = ""
    layer_prefix: str = "model.layers.{i}."
    mlp_gate: str = "mlp.gate_proj"
    mlp_up: str = "mlp.up_proj"
    mlp_down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"            # decoder layer modules the calibration pass runs by name
    attn: str = "self_attn"
    mlp_norm: str = "post_attention_layernorm"
    decoder: str = "model"                        # the HF model's decoder stack (.layers, .rotary_emb)
    activations: tuple[str, ...] = ("silu",)   # gated MLP activations this runtime graph implements
    activation: str = "silu"                   # this model's (config.json hidden_act), set by adapter_for
    # Gemma: RMSNorm scales by (1 + w), which llama.cpp's converter stores as w + 1 in every *norm tensor; the
    # embeddings are scaled by sqrt(hidden_size); attention and MLP outputs pass a norm before the residual add;
    # token_embd keeps only the tokenizer's rows (the converter drops the padding rows)
    norm_shift: float = 0.0
    embed_scale: bool = False
    attn_post_norm: str = ""
    mlp_post_norm: str = ""
    trim_vocab: bool = False
    globals: dict[str, str] = field(default_factory=lambda: {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"})

    @property
    def act(self):
        """The MLP's activation function (torch)."""
        return ACTIVATION_FNS[self.activation]

    def hf_global(self, gguf_name: str) -> str:
        """The HF tensor name of a whole-model tensor, by its GGUF name (token_embd, output_norm, output)."""
        return next(k for k, v in self.globals.items() if v == gguf_name) + ".weight"

    def mlp_names(self, layer: int) -> tuple[str, str, str]:
        p = self.layer_prefix.format(i=layer)
        return (f"{p}{self.mlp_gate}.weight", f"{p}{self.mlp_up}.weight", f"{p}{self.mlp_down}.weight")

    def expected_shapes(self, config: dict, has) -> dict[str, tuple[int, ...]]:
        """Every tensor the converter reads, with the shape config.json implies (torch order, out x in).
        ``has(name)`` says whether the checkpoint holds an optional tensor (biases, an untied lm_head)."""
        d, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
        n_head = config["num_attention_heads"]
        n_kv = config.get("num_key_value_heads") or n_head
        head_dim = config.get("head_dim") or d // n_head
        rows = {"self_attn.q_proj": n_head * head_dim, "self_attn.k_proj": n_kv * head_dim,
                "self_attn.v_proj": n_kv * head_dim}
        vectors = {"input_layernorm": d, "post_attention_layernorm": d, "pre_feedforward_layernorm": d,
                   "post_feedforward_layernorm": d, "self_attn.q_norm": head_dim, "self_attn.k_norm": head_dim}
        out = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
        if has("lm_head.weight"):
            out["lm_head.weight"] = (vocab, d)
        for i in range(config["num_hidden_layers"]):
            p = self.layer_prefix.format(i=i)
            for mod in self.layer_tensors:
                if mod in vectors:
                    out[f"{p}{mod}.weight"] = (vectors[mod],)
                elif mod == "self_attn.o_proj":
                    out[f"{p}{mod}.weight"] = (d, n_head * head_dim)
                else:
                    out[f"{p}{mod}.weight"] = (rows[mod], d)
                    if has(f"{p}{mod}.bias"):
                        out[f"{p}{mod}.bias"] = (rows[mod],)
            gate, up, down = self.mlp_names(i)
            out.update({gate: (ff, d), up: (ff, d), down: (d, ff)})
        return out


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama", "mistral"), "llama", permute_qk=True, layer_tensors=_LLAMA_ATTN,
            note="Llama, Mistral, SmolLM"),
    # Qwen2 is Llama plus q/k/v biases; llama.cpp's llama graph loads those biases as optional tensors, so a
    # Qwen2 MoE file is written as `llama` with Q/K (weights and biases) permuted for llama's rope.
    Adapter("qwen2", ("qwen2",), "llama", permute_qk=True, layer_tensors=_LLAMA_ATTN, note="Qwen2, Qwen2.5"),
    Adapter("qwen3", ("qwen3",), "qwen3", permute_qk=False,
            layer_tensors={**_LLAMA_ATTN, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
            note="Qwen3 (Q/K norm, neox rope)"),
    Adapter("gemma3", ("gemma3_text",), "gemma3", permute_qk=False,
            layer_tensors={"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                           "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                           "post_attention_layernorm": "post_attention_norm",
                           "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
            note="Gemma 3 text (GELU-tanh gated MLP, sandwich norms)", activations=("gelu_pytorch_tanh",),
            mlp_norm="pre_feedforward_layernorm", norm_shift=1.0, embed_scale=True,
            attn_post_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm", trim_vocab=True),
)


def supported_text() -> str:
    return ", ".join(f"{a.name} ({a.note}; model_type {'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config: dict) -> Adapter:
    """The adapter for an HF config.json, or one clear error naming what is supported."""
    model_type = config.get("model_type", "?")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            break
    else:
        raise UserError(f"unsupported architecture model_type={model_type!r} "
                        f"({', '.join(config.get('architectures') or [])}); supported: {supported_text()}")
    act = config.get("hidden_act") or config.get("hidden_activation")
    if act not in adapter.activations:
        raise UserError(f"unsupported MLP activation {act!r} for {model_type}: gated MLPs with "
                        f"{'/'.join(adapter.activations)} are supported")
    if config.get("mlp_bias"):
        raise UserError(f"{model_type} with mlp_bias=true is not supported (expert tensors carry no biases)")
    return replace(adapter, activation=act)
