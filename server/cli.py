"""`kvserve serve [--model PATH] [flags]` (flag names as vLLM's)."""
from __future__ import annotations

import argparse
import logging
import sys

from engine.config import DTYPES, LOAD_FORMATS, EngineConfig, parse_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EngineConfig()
    s.add_argument("--model", default=None, help="HF directory, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's)")
    s.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="weights and KV-cache dtype (auto: float32 on CPU)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="where the model runs")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences decoded together")
    s.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens per engine step; longer prompts are prefilled in chunks")
    s.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides the memory options)")
    s.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="KV pool size in bytes, e.g. 2GiB (CPU default 1GiB)")
    s.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of GPU memory the process may fill (CUDA only)")
    s.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format, help="dummy = random weights, for benchmarks")
    s.add_argument("--seed", type=int, default=d.seed, help="seed of the shared sampling generator")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, load_format=args.load_format, seed=args.seed,
    ).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)
    except ValueError as e:
        print(f"kvserve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from engine.async_llm import AsyncLLM
    from server.app import create_app

    engine = AsyncLLM(config)
    print(describe(engine.engine), flush=True)
    app = create_app(engine, engine.engine.model_name)
    print(f"kvserve: serving on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def describe(engine) -> str:
    c = engine.config
    return (f"model={engine.model_name} device={engine.device} dtype={str(engine.dtype).removeprefix('torch.')} "
            f"kv_blocks={engine.num_kv_blocks} x {c.block_size} tokens = {engine.num_kv_blocks * c.block_size} tokens "
            f"max_model_len={engine.max_model_len} max_num_seqs={c.max_num_seqs}")
