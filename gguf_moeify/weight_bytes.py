"""Weight bytes a decoded token reads: counted from a written GGUF (``bytes_per_token``, ``bench``'s bandwidth
limit), or projected from a model's shape alone (``token_bytes``) for the dense model and finegrained files at
given active fractions, before anything is converted.

On a CPU, decode is bound by the weight bytes a token reads (SYNTHETIC 1B-class files decode at 100-104% of that
limit with 512-neuron experts and 91-97% with 32-neuron ones: docs/benchmark.md, docs/generalisation.md), so dense
bytes / MoE bytes projects a file's decode speed against the dense file.
The counts follow the writer's rules (``stored_weights``: a q4_0 file keeps the output projection, and a tied
token embedding, at q8_0; rows that are not whole blocks fall back to f16) and the finegrained layout
(``sizing.expert_layout``; the shared expert written as always-selected experts, so the router scores all E).
``bytes_per_token`` counts the same parts from a written file; tests check the two agree.
KV-cache reads, which grow with the context, are not counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .sizing import expert_layout
from .stored_weights import head_outtype, row_outtype

ROUTER_DTYPES = {"f32": 4, "f16": 2}


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        """From a Hugging Face ``config.json`` (its ``text_config`` for multimodal wrappers)."""
        c = config.get("text_config", config)
        n_head = int(c["num_attention_heads"])
        return cls(name or str(c.get("_name_or_path") or c.get("model_type", "model")), int(c["hidden_size"]),
                   int(c["intermediate_size"]), int(c["num_hidden_layers"]), n_head,
                   int(c.get("num_key_value_heads") or n_head),
                   int(c.get("head_dim") or int(c["hidden_size"]) // n_head), int(c["vocab_size"]),
                   bool(c.get("tie_word_embeddings", False)))


def matrix_bytes(rows: int, row_length: int, outtype: str) -> int:
    """Bytes of a (rows, row_length) matrix stored in a file of ``outtype`` (the f16 fallback included)."""
    import gguf
    kind = row_outtype(outtype, row_length)
    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind.upper())]
    return rows * row_length // block * size


def token_bytes(shape: ModelShape, outtype: str, active: float | None = None, router_dtype: str = "f32") -> dict:
    """Weight bytes one decoded token reads (``total``) and the file's weight bytes (``file_bytes``), by part, for
    the dense model (``active`` None) or a finegrained file at fraction ``active``; the parts are those of
    ``bytes_per_token``."""
    s, d = shape, shape.n_embd
    q_width, kv_width = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    head = head_outtype(outtype)
    embedding_type = head if s.tied else outtype
    embedding = matrix_bytes(s.n_vocab, d, embedding_type)
    parts = {"embedding_row": embedding // s.n_vocab, "output": matrix_bytes(s.n_vocab, d, head),
             "attention": s.n_layer * (matrix_bytes(q_width + 2 * kv_width, d, outtype)
                                       + matrix_bytes(d, q_width, outtype)),
             "router": 0, "experts_active": 0, "experts_all": 0, "dense_ffn": 0, "norms": (2 * s.n_layer + 1) * d * 4}
    gate_up = matrix_bytes(2 * s.n_ff, d, outtype)
    if active is None:
        parts["dense_ffn"] = s.n_layer * (gate_up + matrix_bytes(d, s.n_ff, outtype))
        layout = None
    else:
        n_exp, shared, top_k = expert_layout("finegrained", s.n_ff, active)
        width = s.n_ff // n_exp
        down = matrix_bytes(d * n_exp, width, outtype)
        parts["experts_all"] = s.n_layer * (gate_up + down)
        parts["experts_active"] = s.n_layer * sum(t * (shared + top_k) // n_exp for t in (gate_up, down))
        parts["router"] = s.n_layer * n_exp * d * ROUTER_DTYPES[router_dtype]
        parts["norms"] += s.n_layer * n_exp * 4     # the selection bias (exp_probs_b), f32
        layout = f"S{shared}A{top_k}E{n_exp}"
    file_bytes = (embedding + (0 if s.tied else parts["output"]) + parts["attention"] + parts["norms"]
                  + parts["router"] + parts["experts_all"] + parts["dense_ffn"])
    total = sum(v for k, v in parts.items() if k != "experts_all")
    return {"total": total, "file_bytes": file_bytes, "layout": layout, **parts}


def bytes_per_token(path: str | os.PathLike, used_slots: list[float] | None = None) -> dict:
    """Weight bytes one decoded token reads from ``path`` (any llama-style GGUF, MoE or dense): every layer tensor,
    routed experts scaled by K/E (the K chosen of E), one row of the token embedding, the output projection (the
    embedding again when tied) and norms. KV-cache reads (grow with the context) are not counted.
    ``used_slots``: the expert slots a token used in each layer, measured (per-token expert counts: the patched
    llama-perplexity's count), instead of the file's K."""
    import gguf
    r = gguf.GGUFReader(path)
    fields = r.fields
    arch = fields["general.architecture"].contents()
    e = fields.get(f"{arch}.expert_count")
    k = fields.get(f"{arch}.expert_used_count")
    n_exp = int(e.contents()) if e is not None else 0
    used = k.contents() if k is not None else 0   # a per-layer list in files with per-layer budgets
    if used_slots is not None:
        used = list(used_slots)
    used_in = lambda name: used[int(name.split(".")[1])] if isinstance(used, list) else used  # noqa: E731
    parts = {"embedding_row": 0, "output": 0, "attention": 0, "router": 0, "experts_active": 0, "experts_all": 0,
             "dense_ffn": 0, "shared_expert": 0, "norms": 0}
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    for name, nb in names.items():
        if name == "token_embd.weight":
            rows = int(r.tensors[[t.name for t in r.tensors].index(name)].shape[1])
            parts["embedding_row"] += nb // rows
            if "output.weight" not in names:
                parts["output"] += nb
        elif name == "output.weight":
            parts["output"] += nb
        elif "_exps." in name:
            parts["experts_all"] += nb
            parts["experts_active"] += int(nb * used_in(name) / max(n_exp, 1))
        elif "_shexp." in name:
            parts["shared_expert"] += nb
        elif "ffn_gate_inp" in name or "ffn_up_inp" in name:
            parts["router"] += nb
        elif ".attn_" in name and "norm" not in name:
            parts["attention"] += nb
        elif name.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            parts["dense_ffn"] += nb
        else:
            parts["norms"] += nb
    total = sum(v for key, v in parts.items() if key != "experts_all")
    return {"total": total, "file_bytes": sum(names.values()), "experts": n_exp, "top_k": used, **parts}
