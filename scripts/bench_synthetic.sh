#!/usr/bin/env bash
# SYNTHETIC (random weights, real shapes) speed benchmark: dense vs MoE with E=16 unit-weight experts at 25% and 50%
# active, q4_0, with the bytes-per-token bandwidth limit. Usage: bash scripts/bench_synthetic.sh [1b|7b] [bench args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
SHAPE="${1:-1b}"; shift || true
cd "$ROOT"
[ -x build/llama-cpp/bin/llama-bench ] || bash scripts/build_llama_cpp.sh
"$PY" -m gguf_moeify bench --synthetic "$SHAPE" --configs "moe:0.25:q4_0,moe:0.5:q4_0" -E 16 \
  -t 1 -r 3 -p 64 -n 32 -o "out/bench-synthetic-$SHAPE" "$@"
