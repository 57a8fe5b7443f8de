#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.sh needs on a machine with no network into one
# directory (default dist/gpu-check/), at most 64 MiB in all:
#
#   llama-cpp-python-<V>-trimmed.tar.gz   the pinned llama-cpp-python sdist cut down to
#                                         the llama.cpp source of the shared libraries
#                                         (CPU + CUDA backends), llama-imatrix,
#                                         llama-quantize and llama-perplexity, plus the
#                                         llama_cpp Python package (at most 40 MiB)
#   wheels/*.whl                          the pure-Python / cp312 manylinux wheels the
#                                         check imports that such a machine lacks (gguf,
#                                         tqdm, PyYAML, Jinja2, MarkupSafe, diskcache,
#                                         typing-extensions)
#   imatrix-pipeline.tar.gz               this repository at HEAD (git archive)
#
# Why trimmed: the sdist is ~75 MiB, mostly models, docs and backends we never build.
# The trim keeps upstream files byte for byte except tools/CMakeLists.txt, which is
# replaced by one that adds only the three tools (the others' sources are dropped).
#
# Needs: network access to PyPI (pip download), git, tar, gzip.
# Usage: scripts/pack-llama-source.sh [OUTDIR]
#   LLAMA_SDIST=path/to/llama_cpp_python-<V>.tar.gz   reuse a downloaded sdist
#   WHEEL_PYTHON=3.12                                  Python version of the target
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEEL_PYTHON="${WHEEL_PYTHON:-3.12}"
PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist/gpu-check}"
MAX_SRC_MIB=40
MAX_ALL_MIB=64
# wheels the check imports beyond numpy/pandas (pinned to what the project is tested with)
WHEELS=(
    "gguf==0.19.0" "tqdm" "PyYAML" "Jinja2" "MarkupSafe" "diskcache" "typing-extensions"
)
# llama.cpp paths kept from the sdist's vendor/llama.cpp
KEEP=(CMakeLists.txt LICENSE cmake include src common vendor licenses ggml/CMakeLists.txt
    ggml/cmake ggml/include ggml/src tools/imatrix tools/perplexity tools/quantize)
# ggml backends dropped (gpu_check builds CPU and CUDA only)
DROP_BACKENDS=(ggml-blas ggml-cann ggml-et ggml-hexagon ggml-hip ggml-metal ggml-musa
    ggml-opencl ggml-openvino ggml-rpc ggml-sycl ggml-virtgpu ggml-vulkan ggml-webgpu
    ggml-zdnn ggml-zendnn)

mib() { echo $((($(du -sb "$1" | cut -f1) + 1048575) / 1048576)); }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sdist="${LLAMA_SDIST:-}"
if [ -z "$sdist" ]; then
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$work/dl" >&2
    sdist="$work/dl/llama_cpp_python-$VERSION.tar.gz"
fi
tar -xzf "$sdist" -C "$work"
full="$work/llama_cpp_python-$VERSION"
name="llama-cpp-python-$VERSION-trimmed"
trim="$work/$name"
mkdir -p "$trim/vendor/llama.cpp"
cp -a "$full/llama_cpp" "$full/CMakeLists.txt" "$full/pyproject.toml" "$full/LICENSE.md" \
    "$full/README.md" "$trim/"
for p in "${KEEP[@]}"; do
    mkdir -p "$trim/vendor/llama.cpp/$(dirname "$p")"
    cp -a "$full/vendor/llama.cpp/$p" "$trim/vendor/llama.cpp/$p"
done
for b in "${DROP_BACKENDS[@]}"; do rm -rf "$trim/vendor/llama.cpp/ggml/src/$b"; done
rm -rf "$trim/llama_cpp/lib"
cat >"$trim/vendor/llama.cpp/tools/CMakeLists.txt" <<'EOF'
# Trimmed by imatrix-pipeline's scripts/pack-llama-source.sh: only the tools the
# parity checks compare against (upstream adds every tool here).
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(imatrix)
add_subdirectory(perplexity)
add_subdirectory(quantize)
EOF

mkdir -p "$OUT"
rm -rf "$OUT/wheels"
tar -C "$work" -czf "$OUT/$name.tar.gz.tmp" "$name"
mv "$OUT/$name.tar.gz.tmp" "$OUT/$name.tar.gz"
"$PYTHON" -m pip download --quiet --only-binary :all: --no-deps \
    --python-version "$WHEEL_PYTHON" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 -d "$OUT/wheels" "${WHEELS[@]}" >&2
git -C "$ROOT" archive --format=tar.gz --prefix=imatrix-pipeline/ \
    -o "$OUT/imatrix-pipeline.tar.gz" HEAD

src_mib=$(mib "$OUT/$name.tar.gz")
all_mib=$(mib "$OUT")
echo "trimmed source: $src_mib MiB (limit $MAX_SRC_MIB); everything: $all_mib MiB (limit $MAX_ALL_MIB)" >&2
if [ "$src_mib" -gt "$MAX_SRC_MIB" ] || [ "$all_mib" -gt "$MAX_ALL_MIB" ]; then
    echo "error: $OUT is over its size limit" >&2
    exit 1
fi
echo "$OUT"
