#!/usr/bin/env bash
# Set up (or reuse) the environment, build llama.cpp (patched, stock for the "unchanged stock files" tests, and
# patched with the RPC backend for tests/test_rpc.py; all cached under ~/.cache/gguf_moeify, so only the first run on
# a machine compiles, ~7 min each on 2 cores), and run the test suite. Extra arguments go to pytest.
# GGUF_MOEIFY_SKIP_LLAMA_BUILD=1 skips the builds (the llama.cpp tests then skip with the command that builds it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if [ "${GGUF_MOEIFY_SKIP_LLAMA_BUILD:-0}" != "1" ]; then
  PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/scripts/build_llama_cpp.sh" cpu
  PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/scripts/build_llama_cpp.sh" cpu --stock
  PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/scripts/build_llama_cpp.sh" cpu --rpc
fi
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
