#!/usr/bin/env python3
"""Where each GGUF's decode time goes on this machine (MLP, output projection, attention products, other), and for
the first file, what any MoE conversion of its MLP could gain at given active fractions.

Needs the profiling build: ``bash scripts/build_llama_cpp.sh --profile`` (the patch series plus a per-node timer,
llama-bench only, in build/llama-cpp-prof/bin). Each run is ``llama-bench -p 0 -n N -r 1`` with GGML_NODE_TIMER set;
the table gives medians over the runs. Times are thread 0's wall time per graph node including the barrier after
it, so they add up to the graph's compute time (sampling and graph building are not in them).

Usage:
  scripts/profile_decode.py DENSE.gguf [MOE.gguf ...] [-n 128] [-t 2] [--runs 3] [--active 0.25,0.5,0.75]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.decode_profile import PARTS, moe_speedup_bound, parse  # noqa: E402


def profile_once(bench: Path, model: Path, n_gen: int, threads: int) -> dict:
    proc = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(n_gen), "-r", "1", "-t", str(threads)],
                          capture_output=True, text=True, env={**os.environ, "GGML_NODE_TIMER": "1"})
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        sys.exit(f"profile_decode: llama-bench failed on {model}:\n{tail}")
    try:
        return parse(proc.stderr)
    except ValueError as e:
        sys.exit(f"profile_decode: {model}: {e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", metavar="FILE.gguf", help="files to profile; the first one's MLP share "
                                                                     "gives the bounds (give the dense file first)")
    p.add_argument("--n-gen", "-n", type=int, default=128, help="tokens generated per run")
    p.add_argument("--threads", "-t", type=int, default=2, help="llama-bench threads")
    p.add_argument("--runs", "-r", type=int, default=3, help="runs per file (files alternate)")
    p.add_argument("--active", default="0.25,0.5,0.75", help="active MLP fractions for the bounds")
    p.add_argument("--bin", default=str(ROOT / "build" / "llama-cpp-prof" / "bin"), help="profiling build")
    args = p.parse_args(argv)
    bench = Path(args.bin) / "llama-bench"
    if not bench.is_file():
        sys.exit(f"profile_decode: no {bench}; build it with: bash scripts/build_llama_cpp.sh --profile")
    models = [Path(m) for m in args.models]
    for m in models:
        if not m.is_file():
            sys.exit(f"profile_decode: no such file: {m}")
    active = [float(a) for a in args.active.split(",")]
    runs: dict[Path, list[dict]] = {m: [] for m in models}
    for r in range(args.runs):
        for m in models:
            runs[m].append(profile_once(bench, m, args.n_gen, args.threads))
            print(f"run {r + 1}/{args.runs} {m.name}: {runs[m][-1]['us_per_token'] / 1000:.2f} ms/token",
                  file=sys.stderr, flush=True)

    print(f"decode time by part, llama-bench -p 0 -n {args.n_gen} -t {args.threads}, median of {args.runs} runs "
          f"(min-max)")
    print("| file | ms/token | " + " | ".join(PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for m in models:
        ms = [x["us_per_token"] / 1000 for x in runs[m]]
        cells = [f"{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})"]
        for part in PARTS:
            v = [x["shares"][part] for x in runs[m]]
            cells.append(f"{statistics.median(v):.1%} ({min(v):.1%}-{max(v):.1%})")
        print(f"| {m.name} | " + " | ".join(cells) + " |")
    mlp = [x["shares"]["mlp"] for x in runs[models[0]]]
    bounds = ", ".join(f"{a:.0%} active: {moe_speedup_bound(max(mlp), a):.2f}x" for a in active)
    print(f"\n{models[0].name}: an MoE MLP (free router, experts at the dense products' speed per weight) decodes at "
          f"most {bounds} as fast (largest MLP share of the runs, {max(mlp):.1%})")


if __name__ == "__main__":
    main()
