#!/usr/bin/env bash
# Peer: `transformers serve --continuous-batching` (transformers' own paged-attention server).
#
#   benchmarks/peers/transformers_serve.sh PORT
#
# Same float32 weights as kvserve: the bundled model's converted HF directory (transformers'
# GGUF path fails for serving: the GGUF-loaded config has no `architectures`). It runs from
# the project's venv, which already has transformers, fastapi and uvicorn.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
port="${1:?port}"
model="$("$HERE/.venv/bin/python" -c 'from engine.model_loader import bundled_model_dir; print(bundled_model_dir())')"
# /v1/models lists the HF hub cache, which must exist; an empty one will do
export HF_HUB_CACHE="${HF_HUB_CACHE:-$HERE/benchmarks/.peers/hf-hub-cache}"
mkdir -p "$HF_HUB_CACHE"
exec "$HERE/.venv/bin/transformers" serve --continuous-batching --device cpu --dtype float32 \
    --host 127.0.0.1 --port "$port" "$model"
