# kvserve image: `docker build -t kvserve .`, then `docker run -p 8000:8000 kvserve`.
# CPU by default. For NVIDIA GPUs, a CUDA base and the matching torch build, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t kvserve:cuda .
#   docker run --gpus all -p 8000:8000 kvserve:cuda
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# make, g++ (the C++ CPU kernels, engine/kernels/cpu.cpp, are built with it by `make install`, and
# again at the first start on a CPU unlike the build machine's; without it the server falls back to
# the slower eager paths), and Python where the base has none
# (CUDA bases); versions come with the base's release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make g++ \
 && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3 python3-venv; fi \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user owns the app and its model cache.
RUN groupadd --gid 10001 kvserve && useradd --no-log-init --create-home --uid 10001 --gid 10001 kvserve
WORKDIR /app
RUN chown 10001:10001 /app
USER 10001:10001
ENV KVSERVE_CACHE_DIR=/app/.cache PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

COPY --chown=10001:10001 pyproject.toml Makefile README.md ./
COPY --chown=10001:10001 engine ./engine
COPY --chown=10001:10001 server ./server
# The same bootstrap as on a fresh machine: torch, the project, the bundled model converted once.
RUN make install TORCH_INDEX=${TORCH_INDEX} EXTRAS=

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["/app/.venv/bin/kvserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
