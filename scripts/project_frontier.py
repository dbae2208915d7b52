#!/usr/bin/env python3
"""Projected decode speed of finegrained q4_0 files against the dense model at f16 / q8_0 / q4_0, for the shapes
users convert (0.1B-8B), from the weight bytes a token reads (``gguf_moeify.weight_bytes``). On a CPU decode is
bound by those bytes, so dense q4_0 bytes / file bytes is the speed a file can reach against dense q4_0 (the bound:
a SYNTHETIC 1B-class file of 32-neuron experts reached 91-97% of it, SmolLM2-135M's files 79-87%;
docs/generalisation.md). No quality is projected.

    .venv/bin/python scripts/project_frontier.py                    # the built-in shapes
    .venv/bin/python scripts/project_frontier.py --config path/to/config.json --router-dtype f16

Prints a markdown table, a row per model (``--json``: one object per file, every part of its bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_moeify.weight_bytes import ROUTER_DTYPES, ModelShape, token_bytes  # noqa: E402

# name: hidden, intermediate, layers, heads, kv heads, head dim, vocab, tied (from each model's public config.json)
SHAPES = {
    "SmolLM2-135M": (576, 1536, 30, 9, 3, 64, 49152, True),
    "Gemma-3-270M": (640, 2048, 18, 4, 1, 256, 262144, True),
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 64, 151936, True),
    "Gemma-3-1B": (1152, 6912, 26, 4, 1, 256, 262144, True),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 64, 128256, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 128, 151936, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128, 128256, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 128, 152064, False),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256, False),
}
DENSE_TYPES = ("f16", "q8_0", "q4_0")
FRACTIONS = (0.25, 0.5, 0.75)


def rows_for(shape: ModelShape, router_dtype: str) -> list[dict]:
    """The dense files (``active`` None) and the finegrained q4_0 files of ``shape``, with their bytes."""
    rows = [{"model": shape.name, "outtype": t, "active": None, "file": f"dense {t}", **token_bytes(shape, t)}
            for t in DENSE_TYPES]
    for f in FRACTIONS:
        b = token_bytes(shape, "q4_0", f, router_dtype)
        rows.append({"model": shape.name, "outtype": "q4_0", "active": f,
                     "file": f"finegrained {f:.0%} ({b['layout']}) q4_0", **b})
    base = next(r["total"] for r in rows if r["file"] == "dense q4_0")
    for r in rows:
        r["mlp_share"] = (r["dense_ffn"] + r["experts_active"] + r["router"]) / r["total"]
        r["bound_vs_dense_q4_0"] = base / r["total"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", action="append", default=[],
                    help="a Hugging Face config.json to add (repeatable); without it, the built-in shapes")
    ap.add_argument("--router-dtype", choices=tuple(ROUTER_DTYPES), default="f32",
                    help="the router's type in the MoE files (convert --router-dtype)")
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = ap.parse_args(argv)
    shapes = [ModelShape.from_config(json.loads(Path(p).read_text()), Path(p).parent.name) for p in args.config]
    shapes = shapes or [ModelShape(name, *dims) for name, dims in SHAPES.items()]
    rows = [r for s in shapes for r in rows_for(s, args.router_dtype)]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print("| model | d_ff | 50% layout | dense q8_0 / q4_0 MB a token (MLP share) | dense q4_0 / MoE q4_0 file GB | "
          "bound vs dense q4_0 at 25% / 50% / 75% active |")
    print("|---|---|---|---|---|---|")
    for s in shapes:
        by = {(r["outtype"], r["active"]): r for r in rows if r["model"] == s.name}
        q8, q4, moe = by["q8_0", None], by["q4_0", None], by["q4_0", 0.5]
        bounds = " / ".join(f"{by['q4_0', f]['bound_vs_dense_q4_0']:.2f}x" for f in FRACTIONS)
        print(f"| {s.name} | {s.n_ff} | {moe['layout']} | {q8['total'] / 1e6:.0f} / {q4['total'] / 1e6:.0f} "
              f"({q4['mlp_share']:.0%}) | {q4['file_bytes'] / 1e9:.2f} / {moe['file_bytes'] / 1e9:.2f} | {bounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
