#!/usr/bin/env bash
# The llama.cpp parity and CPU-kernel tests on emulated 64-bit ARM: the patched series cross-compiled for aarch64
# at two CPU feature levels and run under qemu-user on this x86_64 machine.
#   armv8.2-a+dotprod on qemu's cortex-a76 (dotprod, no i8mm: q4_0 repacked to 4x4 blocks)
#   armv8.6-a+i8mm    on qemu's max CPU    (i8mm: q4_0 repacked to 4x8 blocks, the int8 matrix-multiply kernels)
# Needs Debian's g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user). Each build
# takes ~7 min on 2 cores (cached afterwards, like the x86 builds); the tests run ~10-20x slower than natively.
# Usage: bash scripts/test_aarch64.sh [pytest arguments]   (default: the parity and CPU-kernel test files, tiny models)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 not found: apt-get install qemu-user" >&2; exit 1; }
TESTS=("$@")
# the two SmolLM2-135M tests are left out by default: an f32 perplexity of 4 x 512 tokens ran > 20 min under qemu
[[ ${#TESTS[@]} -gt 0 ]] || TESTS=(tests/test_llama_cpp_parity.py tests/test_cpu_expert_kernels.py -k "not real_model")
rc=0
for level in "armv8.2-a+dotprod cortex-a76" "armv8.6-a+i8mm max"; do
    read -r arch cpu <<< "$level"
    ARM_ARCH="$arch" PYTHON="$PY" bash scripts/build_llama_cpp.sh aarch64
    bin="$ROOT/build/llama-cpp-aarch64-${arch//+/_}/bin"
    echo "== $arch on qemu-aarch64 -cpu $cpu: $bin"
    qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu "$cpu" "$bin/llama-perplexity" --version 2>&1 | tail -n 2
    GGUF_MOEIFY_LLAMA_BIN="$bin" GGUF_MOEIFY_LLAMA_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
        "$PY" -m pytest -q -rs "${TESTS[@]}" || rc=1
done
exit $rc
