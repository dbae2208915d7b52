#!/usr/bin/env bash
# Build llama.cpp (pinned commit 0c1e57098) with the gguf_moeify patch series, for the runtime tests and evaluation.
#
# Usage: bash scripts/build_llama_cpp.sh [cpu|cuda|metal|aarch64] [--stock | --profile] [--rpc] [--with-cli]
#   cpu (default)  plain CPU build
#   cuda           adds -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON; cuBLAS comes from PyPI's nvidia-cublas wheel
#                  (the venv's, else pip-installed once into the cache) and is passed to CMake by path
#                  (-DCUDAToolkit_ROOT is left to nvcc's location; CUDA_cublas_LIBRARY / CUDA_cublasLt_LIBRARY and
#                  the include dir point into the wheel). CMAKE_CUDA_ARCHITECTURES (env) picks the GPUs; default
#                  native, or 90 when no GPU is visible. Into build/llama-cpp-cuda/bin (run the tools from there
#                  with GGUF_MOEIFY_LLAMA_BIN). sm_90 alone: 285 objects; the last 192 took 23 min on 2 idle cores.
#   metal          adds -DGGML_METAL=ON (macOS only)
#   aarch64        cross-compiled on x86_64 Linux for 64-bit ARM Linux with Debian's g++-aarch64-linux-gnu, for the
#                  CPU features of ARM_ARCH (env; -DGGML_CPU_ARM_ARCH, default armv8.2-a+dotprod; e.g.
#                  armv8.6-a+i8mm), with OpenMP as the x86 build (so libstdc++ and libgomp stay shared libraries:
#                  on ARM Linux they are the system's; here qemu-user finds them with -L /usr/aarch64-linux-gnu),
#                  into build/llama-cpp-aarch64-<ARM_ARCH>/bin; see scripts/test_aarch64.sh
#   --rpc          also llama.cpp's RPC backend (-DGGML_RPC=ON) and its server ggml-rpc-server, into
#                  build/llama-cpp-rpc/bin
#   --stock        unpatched llama.cpp, only llama-perplexity and llama-completion (reference for "stock" files)
#   --profile      the patch series plus scripts/profile/node-timer.patch (per-node timing), only llama-bench, into
#                  build/llama-cpp-prof/bin, for scripts/profile_decode.py
#   --with-cli     also build llama-cli and llama-server (both link the server code: a few min more on 2 cores)
#   --configure-only  stop after CMake configure (checks a backend's toolchain without the long build)
#
# Source: gguf_moeify.llama_cpp_source.llama_cpp_source() (LLAMA_CPP_DIR, the cache, git clone, or the PyPI sdist of
# llama-cpp-python 0.3.36 which vendors the same commit). It is never modified: it is copied to
#   ${GGUF_MOEIFY_CACHE:-~/.cache/gguf_moeify}/builds/<commit>-<backend>-<sha256 of patches/*.patch | stock>/src
# where patches/*.patch are applied in order with `patch -p1`, and built in .../build. The cache lives outside the
# clone, so CI on the same machine reuses it; when a build for the key is complete this script only re-copies.
# Each edit of patches/ makes a new key (~300 MB a CPU build): after a patched build, only the
# GGUF_MOEIFY_KEEP_BUILDS (default 3) most recently used patched builds of the commit and backend are kept.
#
# CMake flags (all backends):
#   -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF
#   -DLLAMA_BUILD_COMMIT=0c1e57098 -DLLAMA_BUILD_NUMBER=0  (the vendored tree has no usable .git; without these ninja
#                                                           can loop on regeneration)
#   -DBUILD_SHARED_LIBS=OFF   static binaries: bin/ can be copied anywhere without shared libs
#   -DLLAMA_BUILD_SERVER=OFF unless --with-cli; -DLLAMA_OPENSSL=OFF
#   x86_64: CMAKE_C_FLAGS/CMAKE_CXX_FLAGS -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 (cache key $COMMIT-cpu-noamx-...; see the
#   note at KEY below; GGML_MOEIFY_AMX=1 leaves AMX to ggml)
# Output: <project>/build/llama-cpp/bin (patched), build/llama-cpp-stock/bin (--stock) or build/llama-cpp-prof/bin
# (--profile), plus BUILD_INFO. A --profile build's cache key ends in -prof; one is kept besides the patched ones.
# Environment: PYTHON (interpreter with gguf_moeify importable; default .venv/bin/python), GGUF_MOEIFY_CACHE,
#              LLAMA_CPP_DIR, JOBS (parallel build jobs; default nproc), EXTRA_CMAKE_ARGS, GGUF_MOEIFY_KEEP_BUILDS.
set -euo pipefail

COMMIT=0c1e57098
BACKEND=cpu
STOCK=0
PROFILE=0
WITH_CLI=0
CONFIGURE_ONLY=0
RPC=0
for arg in "$@"; do
    case "$arg" in
        cpu|cuda|metal|aarch64) BACKEND="$arg" ;;
        --rpc) RPC=1 ;;
        --stock) STOCK=1 ;;
        --profile) PROFILE=1 ;;
        --with-cli) WITH_CLI=1 ;;
        --configure-only) CONFIGURE_ONLY=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "build_llama_cpp.sh: unknown argument '$arg' (expected cpu|cuda|metal|aarch64, --stock, --profile, --rpc, --with-cli, --configure-only)" >&2; exit 2 ;;
    esac
done
[[ $STOCK == 1 && $PROFILE == 1 ]] && { echo "build_llama_cpp.sh: --stock and --profile exclude each other" >&2; exit 2; }

PROJECT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$PROJECT/.venv/bin/python" ]]; then PYTHON="$PROJECT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
CACHE="${GGUF_MOEIFY_CACHE:-$HOME/.cache/gguf_moeify}"
JOBS="${JOBS:-$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)}"

T_START=$SECONDS
T_STEP=$SECONDS
step() {  # step "name": report how long the previous step took, then announce the next one
    local now=$SECONDS
    if [[ -n "${STEP_NAME:-}" ]]; then echo "[build_llama_cpp] ${STEP_NAME}: $((now - T_STEP)) s"; fi
    STEP_NAME="$1"; T_STEP=$now
    [[ -n "$1" ]] && echo "[build_llama_cpp] == $1"
    return 0
}
die() { echo "build_llama_cpp.sh: $*" >&2; exit 1; }

# ---- tools
step "tools"
command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake, or pip install cmake)"
command -v patch >/dev/null || die "patch not found: install it (apt-get install patch)"
if ! command -v ninja >/dev/null; then
    if [[ -x "$(dirname "$PYTHON")/ninja" ]]; then
        export PATH="$(dirname "$PYTHON"):$PATH"
    else
        echo "[build_llama_cpp] ninja not found: installing it with pip"
        "$PYTHON" -m pip install --quiet ninja || die "could not install ninja (apt-get install ninja-build)"
        export PATH="$(dirname "$PYTHON"):$PATH"
    fi
fi

# ---- source
step "source"
SRC="$(cd "$PROJECT" && "$PYTHON" -c 'from gguf_moeify.llama_cpp_source import llama_cpp_source; print(llama_cpp_source())')" \
    || die "could not obtain the llama.cpp source (see the message above)"
[[ -f "$SRC/src/llama-graph.cpp" ]] || die "$SRC is not a llama.cpp tree"

PATCHES=()
if [[ $STOCK == 0 ]]; then
    shopt -s nullglob
    PATCHES=("$PROJECT"/patches/*.patch)
    shopt -u nullglob
    [[ ${#PATCHES[@]} -gt 0 ]] || die "no patches in $PROJECT/patches"
    if [[ $PROFILE == 1 ]]; then
        PATCHES+=("$PROJECT/scripts/profile/node-timer.patch")
        PKEY="$(cat "${PATCHES[@]}" | sha256sum | cut -c1-16)-prof"
        OUT="$PROJECT/build/llama-cpp-prof"
        TARGETS=(llama-bench)
    else
        PKEY="$(cat "${PATCHES[@]}" | sha256sum | cut -c1-16)"
        OUT="$PROJECT/build/llama-cpp"
        TARGETS=(llama-perplexity llama-bench llama-quantize llama-completion)
    fi
else
    PKEY=stock
    OUT="$PROJECT/build/llama-cpp-stock"
    TARGETS=(llama-perplexity llama-completion)
fi
[[ $WITH_CLI == 1 ]] && TARGETS+=(llama-cli llama-server)
if [[ $RPC == 1 ]]; then
    TARGETS+=(ggml-rpc-server)
    [[ $STOCK == 0 && $PROFILE == 0 ]] && OUT="$PROJECT/build/llama-cpp-rpc"
fi
# the backend part of the cache key (and of the folder of old builds pruned below)
KEY_BACKEND="$BACKEND"
if [[ $BACKEND == aarch64 ]]; then
    ARM_ARCH="${ARM_ARCH:-armv8.2-a+dotprod}"
    [[ "$ARM_ARCH" =~ ^armv[0-9.]+-a(\+[a-z0-9]+)*$ ]] || die "ARM_ARCH '$ARM_ARCH' is not like armv8.2-a+dotprod"
    command -v aarch64-linux-gnu-g++ >/dev/null \
        || die "aarch64-linux-gnu-g++ not found: install it (apt-get install g++-aarch64-linux-gnu)"
    KEY_BACKEND="aarch64-${ARM_ARCH//+/_}"
    OUT="${OUT/\/build\/llama-cpp/\/build\/llama-cpp-aarch64-${ARM_ARCH//+/_}}"
fi
# a CUDA build gets its own folder, so it never replaces the CPU build the tests and bench use by default
# (point GGUF_MOEIFY_LLAMA_BIN at it)
[[ $BACKEND == cuda ]] && OUT="${OUT/\/build\/llama-cpp/\/build\/llama-cpp-cuda}"
[[ $RPC == 1 ]] && KEY_BACKEND="$KEY_BACKEND-rpc"
# x86: no AMX tile kernels (ggml's -march=native would compile them in on Sapphire Rapids and later). Seen here: a VM
# whose CPU reports AMX ran them into SIGILL (tilezero on a tile whose configuration the VM had not kept), in the
# stock build as well, for any q4_0/q8_0 batch; and the patch series' MUL_MAT_ID kernels are the repacked ones.
# GGML_MOEIFY_AMX=1 keeps ggml's default.
NO_AMX_FLAGS=""
if [[ "$(uname -m)" == x86_64 && "${GGML_MOEIFY_AMX:-0}" != 1 && $BACKEND != aarch64 ]]; then
    NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
KEY="$COMMIT-$KEY_BACKEND${NO_AMX_FLAGS:+-noamx}-$PKEY"
WORK="$CACHE/builds/$KEY"
STAMP="$WORK/build/.complete-$(echo "${TARGETS[*]}" | tr ' ' '+')"
echo "[build_llama_cpp] source $SRC"
echo "[build_llama_cpp] work dir $WORK"

if [[ -f "$STAMP" ]]; then
    echo "[build_llama_cpp] cached build is complete: copying only"
else
    # ---- copy + patch (always from a fresh copy, so a half-applied series never survives)
    if [[ ! -f "$WORK/src/.patched" ]]; then
        step "copy + patch"
        rm -rf "$WORK/src.tmp"
        mkdir -p "$WORK"
        cp -a "$SRC" "$WORK/src.tmp"
        rm -rf "$WORK/src.tmp/.git" "$WORK/src.tmp/build"
        for p in "${PATCHES[@]}"; do
            if ! patch -p1 --dry-run --batch --silent -d "$WORK/src.tmp" < "$p" >/dev/null 2>&1; then
                rm -rf "$WORK/src.tmp"
                die "patch $(basename "$p") does not apply to llama.cpp $COMMIT ($SRC)"
            fi
            patch -p1 --batch --silent -d "$WORK/src.tmp" < "$p" >/dev/null
            echo "[build_llama_cpp] applied $(basename "$p")"
        done
        touch "$WORK/src.tmp/.patched"
        rm -rf "$WORK/src" "$WORK/build"
        mv "$WORK/src.tmp" "$WORK/src"
    fi

    # ---- configure
    step "configure"
    CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF
                -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT=$COMMIT -DLLAMA_BUILD_NUMBER=0 -DBUILD_SHARED_LIBS=OFF)
    # explicit both ways: CMake keeps the cached value of a build folder configured before without --with-cli
    if [[ $WITH_CLI == 0 ]]; then CMAKE_ARGS+=(-DLLAMA_BUILD_SERVER=OFF); else CMAKE_ARGS+=(-DLLAMA_BUILD_SERVER=ON); fi
    [[ -n "$NO_AMX_FLAGS" && "$BACKEND" != cuda ]] && CMAKE_ARGS+=(-DCMAKE_C_FLAGS="$NO_AMX_FLAGS" -DCMAKE_CXX_FLAGS="$NO_AMX_FLAGS")
    case "$BACKEND" in
        cpu) ;;
        metal) CMAKE_ARGS+=(-DGGML_METAL=ON) ;;
        aarch64)   # later -D values win: no -march=native of the build machine
            CMAKE_ARGS+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
                         -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++
                         -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$ARM_ARCH" -DCMAKE_EXE_LINKER_FLAGS=) ;;
        cuda)
            command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] || die "nvcc not found (install the CUDA toolkit)"
            command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
            # cuBLAS from PyPI (nvidia-cublas; lib/ and include/ under nvidia/cublas or nvidia/cu13): the venv's
            # if any, else installed once into the cache
            find_cublas() { find "$@" -name 'libcublas.so*' 2>/dev/null | head -1; }
            NVIDIA_DIRS="$("$PYTHON" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null || true)"
            CUBLAS_LIB="$( [[ -n "$NVIDIA_DIRS" ]] && find_cublas $NVIDIA_DIRS || true )"
            if [[ -z "$CUBLAS_LIB" ]]; then
                if [[ -z "$(find_cublas "$CACHE/pydeps/nvidia-cublas")" ]]; then
                    echo "[build_llama_cpp] installing nvidia-cublas from PyPI into $CACHE/pydeps/nvidia-cublas"
                    "$PYTHON" -m pip install --quiet --no-deps --target "$CACHE/pydeps/nvidia-cublas" nvidia-cublas \
                        || die "could not install nvidia-cublas (pip install nvidia-cublas)"
                fi
                CUBLAS_LIB="$(find_cublas "$CACHE/pydeps/nvidia-cublas")"
            fi
            [[ -n "$CUBLAS_LIB" ]] || die "libcublas not found in the nvidia-cublas wheel"
            CUBLAS_DIR="$(dirname "$(dirname "$CUBLAS_LIB")")"
            CUBLASLT_LIB="$(ls "$CUBLAS_DIR"/lib/libcublasLt.so* | head -1)"
            [[ -n "$CUBLAS_LIB" && -n "$CUBLASLT_LIB" ]] || die "no libcublas in $CUBLAS_DIR/lib"
            CMAKE_ARGS+=(-DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON
                         -DCUDA_cublas_LIBRARY="$CUBLAS_LIB" -DCUDA_cublasLt_LIBRARY="$CUBLASLT_LIB"
                         -DCMAKE_CUDA_FLAGS="-I$CUBLAS_DIR/include" -DCMAKE_C_FLAGS="$NO_AMX_FLAGS"
                         -DCMAKE_CXX_FLAGS="-I$CUBLAS_DIR/include $NO_AMX_FLAGS"
                         -DCMAKE_BUILD_RPATH="$CUBLAS_DIR/lib")
            # default "native" needs a visible GPU; without one (a build machine) fall back to sm_90
            if [[ -z "${CMAKE_CUDA_ARCHITECTURES:-}" ]] && ! nvidia-smi -L >/dev/null 2>&1; then
                CMAKE_CUDA_ARCHITECTURES=90
                echo "[build_llama_cpp] no GPU visible: CMAKE_CUDA_ARCHITECTURES=90 (set it to choose others)"
            fi
            [[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ]] && CMAKE_ARGS+=(-DCMAKE_CUDA_ARCHITECTURES="$CMAKE_CUDA_ARCHITECTURES")
            ;;
    esac
    [[ $RPC == 1 ]] && CMAKE_ARGS+=(-DGGML_RPC=ON)
    # shellcheck disable=SC2206
    [[ -n "${EXTRA_CMAKE_ARGS:-}" ]] && CMAKE_ARGS+=($EXTRA_CMAKE_ARGS)
    cmake -S "$WORK/src" -B "$WORK/build" "${CMAKE_ARGS[@]}" > "$WORK/configure.log" 2>&1 \
        || { tail -n 30 "$WORK/configure.log" >&2; die "cmake configure failed (full log: $WORK/configure.log)"; }

    if [[ $CONFIGURE_ONLY == 1 ]]; then
        step ""
        echo "[build_llama_cpp] configured (--configure-only): $WORK/build"
        exit 0
    fi

    # ---- build
    step "build (${TARGETS[*]}, $JOBS jobs)"
    cmake --build "$WORK/build" --config Release -j "$JOBS" --target "${TARGETS[@]}" > "$WORK/build.log" 2>&1 \
        || { grep -E "error|Error" "$WORK/build.log" | head -n 20 >&2; tail -n 10 "$WORK/build.log" >&2;
             die "build failed (full log: $WORK/build.log)"; }
    touch "$STAMP"
fi

# ---- install into the project
step "copy to $OUT/bin"
rm -rf "$OUT/bin.tmp"
mkdir -p "$OUT/bin.tmp"
for t in "${TARGETS[@]}"; do
    cp "$WORK/build/bin/$t" "$OUT/bin.tmp/" || die "built binary $t missing in $WORK/build/bin"
done
# shared libraries, if a build was made with them anyway (EXTRA_CMAKE_ARGS=-DBUILD_SHARED_LIBS=ON)
find "$WORK/build/bin" -maxdepth 1 \( -name '*.so*' -o -name '*.dylib' \) -exec cp -a {} "$OUT/bin.tmp/" \; 2>/dev/null || true
rm -rf "$OUT/bin"
mv "$OUT/bin.tmp" "$OUT/bin"
{
    echo "commit=$COMMIT"
    echo "backend=$KEY_BACKEND"
    echo "variant=$([[ $STOCK == 1 ]] && echo stock || { [[ $PROFILE == 1 ]] && echo profile; } || echo patched)"
    echo "patch_key=$PKEY"
    for p in "${PATCHES[@]}"; do echo "patch=$(basename "$p")"; done
    echo "work_dir=$WORK"
} > "$OUT/BUILD_INFO"
# ---- prune older patched builds of this commit and backend (the stock build stays)
if [[ $STOCK == 0 ]]; then
    KEEP="${GGUF_MOEIFY_KEEP_BUILDS:-3}"
    [[ "$KEEP" =~ ^[1-9][0-9]*$ ]] || die "GGUF_MOEIFY_KEEP_BUILDS must be a positive integer, not '$KEEP'"
    touch "$WORK"  # "used now", also when the build came from the cache
    if [[ $PROFILE == 1 ]]; then  # one profiling build (the newest); the patched builds are counted apart
        FILTER=(grep -- '-prof$'); KEEP=1
    else
        FILTER=(grep -v -e '-stock$' -e '-prof$')
    fi
    { ls -1dt "$CACHE/builds/$COMMIT-$KEY_BACKEND${NO_AMX_FLAGS:+-noamx}-"* 2>/dev/null || true; } | { "${FILTER[@]}" || true; } \
        | tail -n +$((KEEP + 1)) | while read -r old; do
            echo "[build_llama_cpp] removing an older patched build: $old"
            rm -rf "$old"
        done
fi
step ""
echo "[build_llama_cpp] done in $((SECONDS - T_START)) s: $OUT/bin"
