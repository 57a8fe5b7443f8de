#!/usr/bin/env bash
# Build llama.cpp's own llama-imatrix, llama-quantize and llama-perplexity from the
# llama.cpp source vendored in the pinned llama-cpp-python sdist.
#
# Why: every parity test compares our output with what these tools write, so they
# must come from exactly the source our Python bindings were built from. The build
# is cached outside the repository (default ~/.cache/imatrix-pipeline) and skipped
# when the binaries are already there. Prints the bin directory on stdout.
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${IMATRIX_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imatrix-pipeline}"
PREFIX="$CACHE/llama.cpp-$VERSION"
BIN="$PREFIX/bin"
TOOLS=(llama-imatrix llama-quantize llama-perplexity)
PYTHON="${PYTHON:-python3}"

have_all() {
    local t
    for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if have_all; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$PREFIX"
work="$(mktemp -d "$PREFIX/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "building llama.cpp tools from llama-cpp-python==$VERSION into $BIN" >&2
"$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
    "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"

cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >&2

tmp_bin="$(mktemp -d "$PREFIX/bin.XXXXXX")"
chmod 755 "$tmp_bin"
for t in "${TOOLS[@]}"; do cp "$work/build/bin/$t" "$tmp_bin/"; done
rm -rf "$BIN"
mv "$tmp_bin" "$BIN"
echo "$BIN"
