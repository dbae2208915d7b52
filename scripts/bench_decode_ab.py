#!/usr/bin/env python3
"""Decode speed of GGUF files on one or more llama.cpp builds, in paired rounds.

Each round runs ``llama-bench -p 0 -n N -r 1`` once on every entry in turn, so a change of machine load hits all
entries of a round alike; the table gives per entry the median tokens/s and the median over rounds of the ratio to
the first entry of the same round (min and max too). On a noisy machine these paired ratios are far steadier than
ratios of separate runs.

Usage:
  scripts/bench_decode_ab.py [-r 15] [-n 128] [-t 2] LABEL=BIN_DIR:FILE.gguf [LABEL=BIN_DIR:FILE.gguf ...]
e.g. before/after a patch on the same file:
  scripts/bench_decode_ab.py before=out/bin-old:moe.gguf after=build/llama-cpp/bin:moe.gguf
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gguf_moeify.errors import UserError  # noqa: E402
from gguf_moeify.llama_cpp import LlamaCppTools  # noqa: E402


def parse_entry(text: str) -> tuple[str, LlamaCppTools, Path]:
    label, sep, rest = text.partition("=")
    bin_dir, sep2, model = rest.partition(":")
    if not (sep and sep2 and label and bin_dir and model):
        sys.exit(f"bench_decode_ab: {text!r}: expected LABEL=BIN_DIR:FILE.gguf")
    tools, model = LlamaCppTools(Path(bin_dir)), Path(model)
    if not tools.has("llama-bench"):
        sys.exit(f"bench_decode_ab: no llama-bench in {bin_dir}")
    if not model.is_file():
        sys.exit(f"bench_decode_ab: no such file: {model}")
    return label, tools, model


def decode_tps(tools: LlamaCppTools, model: Path, n_gen: int, threads: int) -> float:
    try:
        return tools.bench(model, 0, n_gen, threads, 1)["tg_ts"]
    except UserError as e:
        sys.exit(f"bench_decode_ab: {e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("entries", nargs="+", metavar="LABEL=BIN_DIR:FILE.gguf",
                   help="what to time; ratios are to the first entry")
    p.add_argument("--rounds", "-r", type=int, default=15, help="rounds (each runs every entry once)")
    p.add_argument("--n-gen", "-n", type=int, default=128, help="tokens generated per run")
    p.add_argument("--threads", "-t", type=int, default=2, help="llama-bench threads")
    args = p.parse_args(argv)
    entries = [parse_entry(e) for e in args.entries]
    if len({label for label, _, _ in entries}) != len(entries):
        sys.exit("bench_decode_ab: labels must differ")
    tps: dict[str, list[float]] = {label: [] for label, _, _ in entries}
    for r in range(args.rounds):
        for label, tools, model in entries:
            tps[label].append(decode_tps(tools, model, args.n_gen, args.threads))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()),
              file=sys.stderr)
    base = entries[0][0]
    print(f"decode tokens/s, llama-bench -n {args.n_gen} -t {args.threads}, {args.rounds} paired rounds; "
          f"ratio = per-round ratio to {base}, median (min-max)")
    print("| entry | median t/s | ratio |")
    print("|---|---|---|")
    for label, _, _ in entries:
        ratios = [a / b for a, b in zip(tps[label], tps[base])]
        print(f"| {label} | {statistics.median(tps[label]):.1f} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
