#!/usr/bin/env python3
"""Prompt processing (prefill) and decode speed of routed-expert files vs the dense file on the CPU.

SYNTHETIC random-weight files of a real shape (default: the 1B class, n_embd 2048 / n_ff 8192 / 16 layers), dense
and MoE with E unit-weight experts at several active fractions, in q4_0 and q8_0. Each round runs llama-bench once
on every (build, type, file) in turn, the dense file right before its MoE files, so a change of load hits both;
the table gives, per build and file, the median over the rounds of pp and tg tokens/s and of the per-round ratio
MoE / dense. Several builds (``--build NAME=BIN_DIR``) are measured in the same rounds: the before/after table.

Usage:
  scripts/bench_prefill.py --build before=DIR --build after=build/llama-cpp/bin [--shape 1b] [-E 16[,32,...]]
      [--active 0.125,0.25,0.5,1] [--types q4_0,q8_0] [-t 2] [-r 3] [-p 64] [-n 32] [-o out/bench-prefill]
Writes OUT/results.json and OUT/results.md; the synthetic files are cached in OUT/models.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.bench import SYN_OUTTYPES as SYN_TYPES, Config, synthetic_file  # noqa: E402
from gguf_moeify.errors import UserError  # noqa: E402
from gguf_moeify.llama_cpp import LlamaCppTools  # noqa: E402
from gguf_moeify.synthetic import SHAPES  # noqa: E402


def _builds(specs: list[str]) -> dict[str, LlamaCppTools]:
    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name:
            sys.exit(f"bench_prefill: --build {s!r}: expected NAME=BIN_DIR")
        tools = LlamaCppTools(Path(path))
        if not tools.has("llama-bench"):
            sys.exit(f"bench_prefill: no llama-bench in {path}")
        out[name] = tools
    return out


def _configs(experts: list[int], actives: list[float], types: list[str]) -> list[Config]:
    out = []
    for t in types:
        out.append(Config("dense", 0, 0, 0, t))
        for e in experts:
            for f in actives:
                k = round(f * e)
                if not 1 <= k <= e:
                    sys.exit(f"bench_prefill: active fraction {f} of {e} experts is not 1..E experts")
                out.append(Config("moe", e, 0, k, t))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="append", required=True,
                   help="NAME=BIN_DIR of a llama.cpp build with llama-bench (repeat to compare builds)")
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="synthetic shape (default: %(default)s)")
    p.add_argument("--experts", "-E", default="16",
                   help="comma-separated experts per layer, e.g. 16,32,64,128 (default: %(default)s)")
    p.add_argument("--active", default="0.125,0.25,0.5,1",
                   help="comma-separated active fractions, top-k = fraction x E (default: %(default)s)")
    p.add_argument("--types", default="q4_0,q8_0", help="comma-separated weight types (default: %(default)s)")
    p.add_argument("--threads", "-t", type=int, default=2, help="llama-bench threads (default: %(default)s)")
    p.add_argument("--rounds", "-r", type=int, default=3, help="rounds, >= 3 (default: %(default)s)")
    p.add_argument("--n-prompt", "-p", type=int, default=64, help="prompt tokens (default: %(default)s)")
    p.add_argument("--n-gen", "-n", type=int, default=32, help="generated tokens (default: %(default)s)")
    p.add_argument("--out", "-o", default="out/bench-prefill", help="output folder (default: %(default)s)")
    a = p.parse_args(argv)
    if a.rounds < 3:
        sys.exit("bench_prefill: --rounds must be >= 3 (the table gives medians)")
    builds = _builds(a.build)
    try:
        experts = [int(x) for x in a.experts.split(",")]
        actives = [float(x) for x in a.active.split(",")]
    except ValueError as e:
        sys.exit(f"bench_prefill: --experts / --active: {e}")
    types = a.types.split(",")
    if bad := [t for t in types if t not in SYN_TYPES]:
        sys.exit(f"bench_prefill: --types {','.join(bad)}: expected some of {', '.join(SYN_TYPES)}")
    shape = SHAPES[a.shape]
    if bad := [e for e in experts if e < 1 or shape.n_ff % e]:
        sys.exit(f"bench_prefill: --experts {bad[0]}: must divide n_ff = {shape.n_ff}")
    configs = _configs(experts, actives, types)
    out = Path(a.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    files = {}
    for c in configs:
        files[(c.slug, c.outtype)], cached = synthetic_file(shape, c, out / "models", seed=0)
        print(f"{'cached' if cached else 'wrote'} {files[(c.slug, c.outtype)].name}", flush=True)

    runs: dict[tuple, list[dict]] = {}
    for rnd in range(a.rounds):
        for bname, tools in builds.items():
            for c in configs:
                r = tools.bench(files[(c.slug, c.outtype)], a.n_prompt, a.n_gen, a.threads, 1)
                runs.setdefault((bname, c.slug, c.outtype), []).append(r)
                print(f"round {rnd + 1}/{a.rounds} {bname} {c.label}: pp {r['pp_ts']:.1f} tg {r['tg_ts']:.2f} t/s",
                      flush=True)

    rows = []
    for bname in builds:
        for c in configs:
            rs = runs[(bname, c.slug, c.outtype)]
            dense = runs[(bname, "dense", c.outtype)]
            rows.append({
                "build": bname, "type": c.outtype, "experts": c.experts, "top_k": c.top_k,
                "active": c.active_fraction, "label": c.label,
                "pp_ts": statistics.median(r["pp_ts"] for r in rs),
                "tg_ts": statistics.median(r["tg_ts"] for r in rs),
                "pp_vs_dense": statistics.median(r["pp_ts"] / d["pp_ts"] for r, d in zip(rs, dense)),
                "tg_vs_dense": statistics.median(r["tg_ts"] / d["tg_ts"] for r, d in zip(rs, dense)),
                "pp_rounds": [r["pp_ts"] for r in rs], "tg_rounds": [r["tg_ts"] for r in rs],
            })
    meta = {"shape": shape.name, "experts": experts, "threads": a.threads, "rounds": a.rounds,
            "n_prompt": a.n_prompt, "n_gen": a.n_gen, "builds": {k: str(v.bin_dir) for k, v in builds.items()}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"SYNTHETIC {shape.name} (random weights), E = {a.experts} unit-weight experts of n_ff/E neurons, "
             f"{a.threads} threads, "
             f"llama-bench pp{a.n_prompt} / tg{a.n_gen}, median of {a.rounds} rounds", "",
             "| build | type | model | pp t/s | pp vs dense | tg t/s | tg vs dense |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['build']} | {r['type']} | {r['label']} | {r['pp_ts']:.1f} | {r['pp_vs_dense']:.2f}x "
                     f"| {r['tg_ts']:.2f} | {r['tg_vs_dense']:.2f}x |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        sys.exit(f"bench_prefill: {e}")
