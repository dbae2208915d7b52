"""``inspect``: the MoE layout of a GGUF file, per layer; ``inspect --check``: the file against the patched
llama.cpp's contract (``file_contract``), one line per problem on stdout and exit code 1 when it breaks it."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .file_contract import ALWAYS_SELECTED_EXPERTS, PROVENANCE, check_reader


def _reader(path: str):
    import gguf
    if not Path(path).is_file():
        raise UserError(f"file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:
        raise UserError(f"{path}: not a readable GGUF file ({exc})")


def inspect_command(path: str, check: bool = False) -> int:
    """What ``inspect [--check] FILE`` prints; returns the exit code (1: --check found problems)."""
    if not check:
        print(inspect_gguf(path))
        return 0
    report = check_reader(_reader(path))
    for line in report.problems:
        print(f"{path}: {line}")
    for line in report.notes:
        print(f"{path}: note: {line}")
    if report.problems:
        return 1
    if not report.n_expert:
        print(f"{path}: ok: a dense file, it has no experts (expert_count absent or 0)")
    else:
        print(f"{path}: ok: {report.arch} with {report.n_expert} experts, the patched llama.cpp contract holds")
    return 0


def _provenance_line(text) -> str:
    try:
        p = json.loads(text)
        return (f"  made by gguf_moeify {p.get('version')}: method {p.get('method')} "
                f"{json.dumps(p.get('options'), sort_keys=True)} from {p.get('source_model')} ({p.get('outtype')})")
    except (TypeError, ValueError, AttributeError):   # not JSON, or not an object
        return f"  {PROVENANCE}: unreadable (not a JSON object)"


def inspect_gguf(path: str) -> str:
    reader = _reader(path)
    f = reader.fields
    val = lambda k, d=None: f[k].contents() if k in f else d  # noqa: E731
    arch = val("general.architecture", "?")
    lines = [f"{path}", f"  architecture: {arch}   layers: {val(f'{arch}.block_count')}   "
             f"n_embd: {val(f'{arch}.embedding_length')}   dense d_ff: {val(f'{arch}.feed_forward_length')}"]
    keys = ["expert_count", "expert_used_count", "expert_feed_forward_length", "expert_shared_feed_forward_length",
            "expert_router_type", "expert_weights_unit", "expert_gating_func"]
    lines.append("  " + "   ".join(f"{k}: {val(f'{arch}.{k}')}" for k in keys if f"{arch}.{k}" in f))
    if val(ALWAYS_SELECTED_EXPERTS):
        lines.append(f"  the shared expert: the first {val(ALWAYS_SELECTED_EXPERTS)} experts, selected "
                     "for every token (exp_probs_b); counted in expert_count and expert_used_count")
    if val(f"{arch}.expert_count_per_token"):
        lines.append("  per-token expert counts: a token uses the chosen experts whose score + exp_probs_b is above "
                     "0, so expert_used_count is the most it uses (the mean: bench, or eval's measured share)")
    if PROVENANCE in f:
        lines.append(_provenance_line(val(PROVENANCE)))
    problems = check_reader(reader).problems
    if problems:
        lines.append(f"  contract: {len(problems)} problem(s) against the patched llama.cpp's file contract "
                     "(inspect --check lists them)")
    by_layer: dict[int, list] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
            by_layer.setdefault(int(parts[1]), []).append(t)
    for layer in sorted(by_layer):
        parts = []
        for t in by_layer[layer]:
            kind = t.name.split(".")[2]
            if (kind.startswith("ffn_") and kind != "ffn_norm") or kind == "exp_probs_b":
                shape = "x".join(str(int(x)) for x in reversed(t.shape))
                parts.append(f"{kind}[{shape} {t.tensor_type.name}]")
        lines.append(f"  blk.{layer}: " + " ".join(parts))
    return "\n".join(lines)
