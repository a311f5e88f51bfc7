"""`kvserve serve [--model PATH] [flags]` (flag names as vLLM's)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time

from engine.core.config import ATTENTION_BACKENDS, DTYPES, LINEAR_BACKENDS, LOAD_FORMATS, EngineConfig, parse_bytes
from server.guard import ServerOptions, header_deadline_protocol


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EngineConfig()
    s.add_argument("--model", default=None,
                   help="HF directory, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's)")
    s.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="weights and KV-cache dtype (auto: float32 on CPU)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where the model runs")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences decoded together")
    s.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per engine step; longer prompts are prefilled in chunks")
    s.add_argument("--max-prefill-tokens-while-decoding", type=int, default=d.max_prefill_tokens_while_decoding,
                   help="while more sequences decode than wait to start, prefill at most max(this, decoding "
                        "sequences) prompt tokens a step, bounding inter-token latency when long prompts arrive "
                        "(0 = no cap)")
    s.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    s.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (overrides the memory options)")
    s.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV pool size in bytes, e.g. 2GiB (CPU default 1GiB)")
    s.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory the process may fill (CUDA only)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="reuse the KV blocks of prompt prefixes seen before")
    s.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format,
                   help="dummy = random weights, for benchmarks")
    s.add_argument("--linear-backend", choices=LINEAR_BACKENDS, default=d.linear_backend,
                   help="CPU linear layers: auto = oneDNN pre-packed weights plus a C++ kernel for decode steps of "
                        "1-2 sequences (holds the weights twice); onednn = packed only; torch = the reference")
    s.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=d.attention_backend,
                   help="decode attention: auto = the Triton paged kernel on CUDA where Triton is installed, "
                        "a C++ paged kernel on CPU where a C++ compiler is; torch = the reference")
    s.add_argument("--enforce-eager", action="store_true",
                   help="no compiled kernels and no CUDA graphs (faster start, slower decode)")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of the shared sampling generator")
    s.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics (the docs "
                        "too) (default: env KVSERVE_API_KEY, else open)")
    s.add_argument("--max-queue-len", type=int, default=None,
                   help="sequences (prompts x n) that may wait beyond --max-num-seqs; more get 503 + Retry-After "
                        "(default: no limit)")
    s.add_argument("--max-request-body", type=parse_bytes, default=ServerOptions.max_body_bytes,
                   help="largest request body in bytes (e.g. 16MiB); larger ones get 413")
    s.add_argument("--shutdown-timeout", type=float, default=ServerOptions.shutdown_timeout,
                   help="on SIGTERM: seconds in-flight requests may take before they are aborted")
    s.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    s.add_argument("--header-read-timeout", type=float, default=10.0,
                   help="seconds a request line and headers may take to arrive; slower connections are closed")
    s.add_argument("--body-read-timeout", type=float, default=ServerOptions.body_read_timeout,
                   help="seconds a request body may take to arrive; slower ones get 408")
    s.add_argument("--limit-concurrency", type=int, default=512,
                   help="open connections and tasks beyond which new requests get 503 at once")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, load_format=args.load_format, seed=args.seed,
        linear_backend=args.linear_backend, attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
        enable_prefix_caching=args.enable_prefix_caching,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)
    except ValueError as e:
        print(f"kvserve: {e}", file=sys.stderr)
        return 2
    from engine.frontend.async_llm import AsyncLLM
    from server.app import create_app

    problem = _check_server_flags(args)
    if problem:
        print(f"kvserve: {problem}", file=sys.stderr)
        return 2
    options = ServerOptions(api_key=args.api_key or None, max_queue_len=args.max_queue_len,
                            max_body_bytes=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
                            body_read_timeout=args.body_read_timeout)
    engine = AsyncLLM(config)
    print(engine.describe(), flush=True)
    app = create_app(engine, engine.model_name, options)
    print(f"kvserve: serving on http://{args.host}:{args.port}", flush=True)
    server = _DrainingServer(app, engine, options.shutdown_timeout, host=args.host, port=args.port,
                             log_level=args.log_level, timeout_keep_alive=args.timeout_keep_alive,
                             limit_concurrency=args.limit_concurrency,
                             http=header_deadline_protocol(args.header_read_timeout))
    try:
        server.run()
    finally:
        engine.shutdown()
    if engine.error is not None:  # a supervisor (systemd, Kubernetes) restarts a process that exits non-zero
        print(f"kvserve: the engine failed ({engine.error}); exiting", file=sys.stderr)
        return 1
    return 0


def _check_server_flags(args: argparse.Namespace) -> str | None:
    if args.max_queue_len is not None and args.max_queue_len < 0:
        return "max_queue_len: must be non-negative"
    for name in ("timeout_keep_alive", "header_read_timeout", "body_read_timeout", "limit_concurrency"):
        if getattr(args, name) <= 0:
            return f"{name}: must be positive"
    return None


class _DrainingServer:
    """uvicorn, except that SIGTERM/SIGINT first drains: new requests get 503, in-flight ones
    get `timeout` seconds to finish, the rest are aborted (finish_reason "abort"), then exit."""

    def __init__(self, app, engine, timeout: float, **config) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if outer.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                    return super().handle_exit(sig, frame)  # a second signal stops at once
                outer.draining = True
                app.state.draining = True
                outer.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(outer.drain(self)))

        self.app, self.engine, self.timeout, self.draining = app, engine, timeout, False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))

    def run(self) -> None:
        async def serve():
            self.loop = asyncio.get_running_loop()
            watch = asyncio.ensure_future(self.watch_engine())
            try:
                await self.server.serve()
            finally:
                watch.cancel()

        asyncio.run(serve())

    async def watch_engine(self) -> None:
        """Stop serving once the engine has died: /health says 503 meanwhile; main exits 1."""
        while self.engine.is_alive:
            await asyncio.sleep(0.5)
        logging.getLogger("kvserve.server").error("the engine died; shutting down")
        self.server.should_exit = True

    async def drain(self, server) -> None:
        admission = self.app.state.admission
        logging.getLogger("kvserve.server").info("draining: %d sequence(s) in flight", admission.in_flight)
        deadline = time.monotonic() + self.timeout
        while admission.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if admission.in_flight > 0:
            self.engine.abort_all()  # their streams end with finish_reason "abort"
            deadline = time.monotonic() + 5
            while admission.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        server.should_exit = True

