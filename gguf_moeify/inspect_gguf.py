"""``inspect``: the MoE layout of a GGUF file, per layer."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def inspect_gguf(path: str) -> str:
    import gguf
    if not Path(path).is_file():
        raise UserError(f"file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc})")
    f = reader.fields
    val = lambda k, d=None: f[k].contents() if k in f else d  # noqa: E731
    arch = val("general.architecture", "?")
    lines = [f"{path}", f"  architecture: {arch}   layers: {val(f'{arch}.block_count')}   "
             f"n_embd: {val(f'{arch}.embedding_length')}   dense d_ff: {val(f'{arch}.feed_forward_length')}"]
    keys = ["expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
            "expert_router_type", "expert_weights_unit", "expert_gating_func"]
    lines.append("  " + "   ".join(f"{k}: {val(f'{arch}.{k}')}" for k in keys if f"{arch}.{k}" in f))
    if val("gguf_moeify.always_selected_experts"):
        lines.append(f"  the shared expert: the first {val('gguf_moeify.always_selected_experts')} experts, selected "
                     "for every token (exp_probs_b); counted in expert_count and expert_used_count")
    prov = val("gguf_moeify.provenance")
    if prov:
        p = json.loads(prov)
        lines.append(f"  made by gguf_moeify {p.get('version')}: method {p.get('method')} "
                     f"{json.dumps(p.get('options'), sort_keys=True)} from {p.get('source_model')} ({p.get('outtype')})")
    by_layer: dict[int, list] = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            by_layer.setdefault(int(t.name.split(".")[1]), []).append(t)
    for layer in sorted(by_layer):
        parts = []
        for t in by_layer[layer]:
            kind = t.name.split(".")[2]
            if (kind.startswith("ffn_") and kind != "ffn_norm") or kind == "exp_probs_b":
                shape = "x".join(str(int(x)) for x in reversed(t.shape))
                parts.append(f"{kind}[{shape} {t.tensor_type.name}]")
        lines.append(f"  blk.{layer}: " + " ".join(parts))
    return "\n".join(lines)
