#!/usr/bin/env bash
# The README's benchmark on the embedded SmolLM2-135M-Instruct: dense vs MLPMoE (all active) and CMoE/MoEfication
# at 25/50/75% active, q8_0 and q4_0, in the patched llama.cpp. Perplexity, KL-divergence and top-1 agreement vs
# the dense f16 model on the first 10 windows of 512 tokens of Pride and Prejudice; calibration on Sense and
# Sensibility (DATA: a folder with austen_prideprejudice.txt and austen_sensesensibility.txt, the whole novels;
# default: the excerpts bundled in gguf_moeify/data). Extra arguments go to `bench` (e.g. -t 2). Results in
# out/bench-smollm2/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
if [ -n "${DATA:-}" ]; then
  EVAL="$DATA/austen_prideprejudice.txt"; CALIB="$DATA/austen_sensesensibility.txt"
else
  EVAL="$ROOT/gguf_moeify/data/pride_and_prejudice_excerpt.txt"; CALIB="$ROOT/gguf_moeify/data/sense_and_sensibility_excerpt.txt"
fi
for f in "$EVAL" "$CALIB"; do [ -f "$f" ] || { echo "error: $f not found" >&2; exit 2; }; done
cd "$ROOT"
[ -x build/llama-cpp/bin/llama-bench ] || bash scripts/build_llama_cpp.sh
"$PY" -m gguf_moeify demo-model models/smollm2-135m
CONFIGS="mlpmoe:1:q8_0,mlpmoe:1:q4_0"
for m in cmoe moefication; do for f in 0.25 0.5 0.75; do CONFIGS="$CONFIGS,$m:$f:q8_0,$m:$f:q4_0"; done; done
"$PY" -m gguf_moeify bench models/smollm2-135m --configs "$CONFIGS" \
  --text "$EVAL" --ctx 512 --chunks 10 \
  --calib "$CALIB" --calib-samples 2 --calib-seqlen 256 \
  -t 1 -r 3 -p 128 -n 32 -o out/bench-smollm2 "$@"
