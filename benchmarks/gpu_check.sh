#!/usr/bin/env bash
# GPU check: build the pinned llama.cpp once with CUDA, install llama-cpp-python against
# that build, generate synthetic models and compare `imatrix collect -ngl 99` with
# `llama-imatrix -ngl 99` (parity of the imatrices, tokens/s of both and of a plain
# forward pass), with and without activation sums on the GPU, dense (llama) and
# mixture-of-experts (qwen3moe).
#
# What the machine needs
#   - an NVIDIA GPU (written for Hopper, sm_90; CUDA_ARCH=89 etc. for others) and its driver
#   - the CUDA toolkit (12 or 13) with nvcc and cuBLAS (cublas_v2.h, libcublas), CMake >= 3.21,
#     ninja, a C/C++ compiler, tar
#   - Python 3.12 with numpy, pandas and CuPy for the machine's CUDA (cupy-cuda12x or
#     cupy-cuda13x: the device sums; without it their runs say "unavailable" and the rest
#     of the check still runs); pip is not used
#   - no network: everything else comes in one directory made beforehand, elsewhere, by
#     scripts/pack-llama-source.sh (about 5 MiB, at most 64 MiB): the trimmed
#     llama-cpp-python sdist (llama.cpp source + the llama_cpp Python package), the wheels
#     the check imports (gguf, tqdm, PyYAML, Jinja2, MarkupSafe, diskcache,
#     typing-extensions; installed only if the machine's Python lacks them) and this
#     repository as imatrix-pipeline.tar.gz
#   - about 6 GB of disk for the build, the two synthetic models and outputs
#
# Usage (from a checkout of this repository, or the unpacked imatrix-pipeline.tar.gz)
#   benchmarks/gpu_check.sh [BUNDLE_DIR]          default BUNDLE_DIR: dist/gpu-check
# Environment
#   GPU_CHECK_WORK  work directory (default ~/.cache/imatrix-pipeline/gpu-check); the build
#                   directory in it is reused when the script runs again
#   CUDA_ARCH (90)  JOBS (nproc)  CHUNKS (16)  PYTHON (python3)
#   OURS_EXTRA      extra `imatrix collect` flags for a second run of ours, reported beside
#                   the default run
# Device sums: `imatrix collect` sums activations that live on the GPU there (CuPy) unless
# IMATRIX_DEVICE_SUMS=off (copy them to the host, as llama-imatrix does); =on fails instead
# of falling back. The drop-in run below uses the default (auto; its log says which path
# ran); benchmarks/device_sums.py measures on and off side by side.
#
# How it works: ONE CMake build of the trimmed source (BUILD_SHARED_LIBS=ON) gives the
# three tools and the shared libraries they link; llama-cpp-python is not built again:
# its Python package is copied and its lib/ points at that build's libraries (the
# bindings load lib/libllama.so; LLAMA_CPP_LIB_PATH is set too). Budget: about 6 minutes
# on 16 cores with the build. On a machine without an NVIDIA GPU the script builds the
# same source for the CPU, checks the bindings and parity on a tiny model, and stops with
# "no NVIDIA GPU" before anything is compiled for CUDA.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$(cd "${1:-$ROOT/dist/gpu-check}" && pwd)"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WORK="${GPU_CHECK_WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/imatrix-pipeline/gpu-check}"
CUDA_ARCH="${CUDA_ARCH:-90}"
JOBS="${JOBS:-$(nproc)}"
CHUNKS="${CHUNKS:-16}"
PYTHON="${PYTHON:-python3}"
OURS_EXTRA="${OURS_EXTRA:-}"
TOOLS=(llama-imatrix llama-quantize llama-perplexity)
# module:wheel-file-prefix pairs unpacked from the bundle when the Python lacks the module
MODULES=(gguf:gguf tqdm:tqdm yaml:pyyaml jinja2:jinja2 markupsafe:markupsafe
    diskcache:diskcache typing_extensions:typing_extensions)
SRC_NAME="llama-cpp-python-$VERSION-trimmed"
T_RUN=1800 # seconds any single measured command may take

step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*" >&2; }
die() {
    echo "gpu_check: $*" >&2
    exit 1
}

have_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

unpack() {
    [ -f "$BUNDLE/$SRC_NAME.tar.gz" ] || die "$BUNDLE/$SRC_NAME.tar.gz missing (make it with scripts/pack-llama-source.sh)"
    SRC="$WORK/src/$SRC_NAME"
    if [ ! -f "$SRC/.unpacked" ]; then
        step "unpacking $SRC_NAME"
        rm -rf "$SRC" && mkdir -p "$WORK/src"
        tar -xzf "$BUNDLE/$SRC_NAME.tar.gz" -C "$WORK/src"
        touch "$SRC/.unpacked"
    fi
}

build() { # build BACKEND [cmake flags...]
    local backend="$1"
    shift
    BUILD="$WORK/build-$backend"
    [ -f "$BUILD/CMakeCache.txt" ] && step "reusing $BUILD" || step "configuring $BUILD"
    command -v ninja >/dev/null || die "ninja not found"
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF "$@" >"$WORK/cmake-$backend.log" 2>&1 ||
        die "cmake configure failed, see $WORK/cmake-$backend.log"
    step "building $backend: ${TOOLS[*]} + shared libraries ($JOBS jobs)"
    cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}" llama >"$WORK/build-$backend.log" 2>&1 ||
        die "build failed, see $WORK/build-$backend.log"
    BIN="$BUILD/bin"
}

python_env() { # the bindings against $BIN, plus the wheels this Python lacks
    step "installing llama-cpp-python $VERSION against $BIN (no build)"
    local site="$WORK/python" pair whl
    mkdir -p "$site"
    for pair in "${MODULES[@]}"; do
        PYTHONPATH="$site" "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null && continue
        whl=$(ls "$BUNDLE"/wheels/"${pair#*:}"-*.whl 2>/dev/null | head -1)
        [ -n "$whl" ] || die "Python lacks ${pair%%:*} and $BUNDLE/wheels has no ${pair#*:} wheel"
        # a wheel is a zip of the installed tree: unpacking it is installing it (no pip needed)
        "$PYTHON" -m zipfile -e "$whl" "$site" || die "cannot unpack $whl"
    done
    rm -rf "$site/llama_cpp"
    cp -a "$SRC/llama_cpp" "$site/llama_cpp"
    mkdir -p "$site/llama_cpp/lib"
    ln -s "$BIN"/lib*.so "$site/llama_cpp/lib/"
    export PYTHONPATH="$ROOT/src:$site"
    export LLAMA_CPP_LIB_PATH="$BIN" IMATRIX_LLAMA_BIN="$BIN"
    "$PYTHON" -c "import llama_cpp, imatrix.ggml as g; g.libggml_base(); print(llama_cpp.__file__)" >&2 ||
        die "llama_cpp does not load from $site"
}

calibration_text() { # the repository's prose, repeated: enough for CHUNKS chunks
    TEXT="$WORK/calibration.txt"
    local i
    for i in $(seq 40); do cat "$ROOT/data/calibration/prose.txt"; done >"$TEXT"
}

synth() { # synth OUT ARGS...: a synthetic model, made once
    local out="$1"
    shift
    [ -f "$out" ] || timeout "$T_RUN" "$PYTHON" "$ROOT/benchmarks/synthetic_model.py" "$@" -o "$out"
}

device_speed() { # device_speed MODEL: ours with and without device sums, vs llama-imatrix's
    timeout "$T_RUN" "$PYTHON" "$ROOT/benchmarks/device_sums.py" --model "$1" --text "$TEXT" \
        --reference "$WORK/out/ref.gguf" --chunks "$CHUNKS" -c 512 -ngl 99 -t "$JOBS" ||
        die "benchmarks/device_sums.py failed"
}

parity() { # parity MODEL NGL CHUNKS CTX [extra ours flags]: llama-imatrix vs imatrix collect
    local model="$1" ngl="$2" chunks="$3" ctx="$4" extra="${5:-}" out="$WORK/out"
    mkdir -p "$out"
    local common=(-m "$model" -f "$TEXT" --chunks "$chunks" -c "$ctx" -ngl "$ngl" -t "$JOBS" --no-ppl)
    local t0=$SECONDS
    timeout "$T_RUN" "$BIN/llama-imatrix" "${common[@]}" -o "$out/ref.gguf" >"$out/ref.log" 2>&1 ||
        die "llama-imatrix failed, see $out/ref.log"
    local t1=$SECONDS
    # shellcheck disable=SC2086  # OURS_EXTRA holds several flags
    timeout "$T_RUN" "$PYTHON" -m imatrix collect "${common[@]}" $extra -o "$out/ours.gguf" \
        >"$out/ours.log" 2>&1 || die "imatrix collect failed, see $out/ours.log"
    echo "  whole runs: llama-imatrix $((t1 - t0)) s, imatrix collect $((SECONDS - t1)) s ${extra:+($extra)}"
    grep -h "activations" "$out/ours.log" | sed 's/^/  ours: /' || true # where sums ran
    "$PYTHON" - "$ROOT/benchmarks" "$out/ours.gguf" "$out/ref.gguf" <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
from device_sums import parity
from imatrix.formats import read_imatrix
print(f"  parity: {parity(read_imatrix(sys.argv[2]), read_imatrix(sys.argv[3]))}")
EOF
}

speed() { # speed MODEL: tokens/s of both tools and of plain forward passes
    timeout "$T_RUN" "$PYTHON" "$ROOT/benchmarks/collect.py" --model "$1" --text "$TEXT" \
        --chunks "$CHUNKS" -ngl 99 -t "$JOBS" --llama-bin "$BIN" --json >"$WORK/out/speed.json" ||
        die "benchmarks/collect.py failed"
    "$PYTHON" - "$WORK/out/speed.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
for r in s["runs"]:
    print(f"  {r['name']:45s} {r['seconds']:8.2f} s {r['tokens_per_s']:10.1f} tokens/s")
EOF
}

check_model() { # check_model LABEL MODEL
    step "$1: parity and speed, -ngl 99, $CHUNKS chunks x 512"
    echo "$1 ($(basename "$2"))"
    parity "$2" 99 "$CHUNKS" 512
    [ -z "$OURS_EXTRA" ] || parity "$2" 99 "$CHUNKS" 512 "$OURS_EXTRA"
    echo "  with and without device sums (chunk loop, no perplexity):"
    device_speed "$2"
    speed "$2"
}

main() {
    mkdir -p "$WORK"
    unpack
    calibration_text
    if ! have_gpu; then
        build cpu
        python_env
        step "CPU smoke test: parity on a tiny synthetic model"
        synth "$WORK/tiny-llama.gguf" --arch llama --params tiny
        parity "$WORK/tiny-llama.gguf" 0 2 128
        step "no NVIDIA GPU (nvidia-smi lists none): the CPU build works; stopping before any CUDA compile"
        echo "gpu_check: no NVIDIA GPU found; run this on a machine with one (see the header of $0)" >&2
        exit 3
    fi
    command -v nvcc >/dev/null || die "an NVIDIA GPU is present but nvcc is not on PATH"
    nvidia-smi -L >&2
    build cuda -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_CUDA_NCCL=OFF
    python_env
    step "synthetic models (random weights: for speed only)"
    synth "$WORK/llama-1B.gguf" --arch llama --params 1B
    synth "$WORK/qwen3moe-1B.gguf" --arch qwen3moe --params 1B
    check_model "dense llama 1B" "$WORK/llama-1B.gguf"
    check_model "MoE qwen3moe 1B" "$WORK/qwen3moe-1B.gguf"
    step "done"
}

main
