"""Where a GGUF's decode time goes, by part of the model, and what that bounds an MoE conversion to.

Reads the per-node totals that the profiling build prints (``scripts/build_llama_cpp.sh --profile`` adds
``scripts/profile/node-timer.patch``: with GGML_NODE_TIMER set, one ``NODE_TIMER OP:name <us> us <share>% n=<calls>``
line per node type at exit) and sorts them into the MLP, the output projection, attention's weight products and the
rest. For a dense model the MLP's share s bounds what any MoE MLP with a fraction a of its neurons active can gain:
even with a free router and experts at the dense products' speed per weight, a token takes at least 1 - (1 - a)·s of
the dense time (Amdahl's law).
"""
from __future__ import annotations

import re

PARTS = ("mlp", "output", "attention", "other")
_LINE = re.compile(r"^NODE_TIMER (\S+)\s+([\d.]+) us\s+[\d.]+% n=(\d+)", re.M)
# nodes named ffn_* that are not the MLP's work: the residual add before it and its input norm
_NOT_MLP = ("ffn_inp", "ffn_norm")
_ATTENTION_PRODUCTS = ("Qcur", "Kcur", "Vcur", "attn_out")


def part_of(key: str) -> str:
    """The part of the model an ``OP:name`` key belongs to."""
    op, _, name = key.partition(":")
    if name.startswith("ffn_") and name not in _NOT_MLP:
        return "mlp"
    if name == "result_output":
        return "output"
    if op == "MUL_MAT" and name in _ATTENTION_PRODUCTS:
        return "attention"
    return "other"


def parse(stderr: str) -> dict:
    """Totals of one llama-bench run: ``us_per_token`` (all nodes / graph evaluations, counted by the output
    projection's calls) and ``shares`` (part -> fraction of all node time)."""
    rows = [(key, float(us), int(n)) for key, us, n in _LINE.findall(stderr)]
    if not rows:
        raise ValueError("no NODE_TIMER lines: not the profiling build, or GGML_NODE_TIMER unset")
    calls = [n for key, _, n in rows if key.endswith(":result_output")]
    if not calls:
        raise ValueError("no result_output node: cannot count the evaluated tokens")
    total = sum(us for _, us, _ in rows)
    shares = dict.fromkeys(PARTS, 0.0)
    for key, us, _ in rows:
        shares[part_of(key)] += us / total
    return {"us_per_token": total / calls[0], "shares": shares}


def moe_speedup_bound(mlp_share: float, active: float) -> float:
    """Decode speedup over the dense model that an MoE MLP with ``active`` of its neurons cannot exceed."""
    if not 0 < active <= 1 or not 0 <= mlp_share <= 1:
        raise ValueError("active must be in (0, 1] and the MLP share in [0, 1]")
    return 1.0 / (1.0 - (1.0 - active) * mlp_share)
