"""Sliding-window KV memory: the blocks a sequence holds when it has grown to 4x the window.

    python benchmarks/window_memory.py [--window 256] [--seqs 1,8] [--json PATH]

Each sequence: a prompt of `window` random tokens, then 3 x window greedy tokens (ignore_eos), so it
ends at 4x the window. Three tiny random checkpoints of the same shape (4 layers, 2 KV heads of 32,
float32), built from their transformers configs: Mistral with the window on every layer (the pool
gives back the blocks that fall wholly before it), the same Mistral with no window, and Gemma 2 with
the window on alternate layers (its global layers read every block: one table, nothing given back).
Reported per run: the most blocks held at once, the blocks held at the last step before the end,
and the median wall time of the decode steps over the last window's tokens (the windowed decode
kernel reads only the window's blocks). KV bytes are also scaled to Mistral-7B's shape (32 layers,
8 KV heads of 128, float16: 128 KiB per token), which the held blocks do not depend on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from engine import SamplingParams
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.models.loader import bundled_model_dir

SHAPE = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=32, initializer_range=0.2, tie_word_embeddings=False)
MISTRAL_7B_TOKEN_BYTES = 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head_dim, float16
BLOCK_SIZE = 16


def checkpoints(window: int, root: str) -> dict[str, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    kinds = {"mistral, window on every layer": ("mistral", dict(sliding_window=window)),
             "mistral, no window": ("mistral", dict(sliding_window=None)),
             "gemma2, window on alternate layers": ("gemma2", dict(sliding_window=window, query_pre_attn_scalar=32))}
    paths = {}
    for i, (name, (kind, extra)) in enumerate(kinds.items()):
        cfg = AutoConfig.for_model(kind, max_position_embeddings=8 * window, **SHAPE, **extra)
        torch.manual_seed(0)
        path = f"{root}/{i}"
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def run(path: str, window: int, num_seqs: int) -> dict:
    need = num_seqs * (4 * window // BLOCK_SIZE + 2)
    engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=need, block_size=BLOCK_SIZE, max_model_len=8 * window,
                                    max_num_seqs=num_seqs, enable_prefix_caching=False))
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0.0, max_tokens=3 * window, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(str(i), torch.randint(100, 40000, (window,), generator=gen).tolist(), params)
    pool, held, seconds = engine.kv.pool, [], []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - start)
        held.append(pool.num_blocks - pool.num_free)
    assert pool.num_free == pool.num_blocks
    at_end = held[-2]  # the last step's sequences are done and hold nothing
    return {"peak_blocks": max(held), "blocks_at_4x": at_end,
            "kv_mib_at_4x_tiny": at_end * BLOCK_SIZE * kv_bytes_per_token(engine) / 2**20,
            "kv_mib_at_4x_mistral7b": at_end * BLOCK_SIZE * MISTRAL_7B_TOKEN_BYTES / 2**20,
            "decode_ms_last_window": 1000 * statistics.median(seconds[-window:-1])}


def kv_bytes_per_token(engine: LLMEngine) -> int:
    caches = engine.runner.kv_caches  # each [2, blocks, block_size, kv_heads, D]
    return sum(c[:, 0, 0].numel() * c.element_size() for c in caches)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seqs", default="1,8")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    results = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; window {args.window}, blocks of "
          f"{BLOCK_SIZE}, sequences end at {4 * args.window} tokens\n")
    print("| model | sequences | peak blocks | blocks at 4x window | KV MiB at 4x (tiny) | KV MiB at 4x "
          "(Mistral-7B shape) | decode step, last window, ms |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name, path in checkpoints(args.window, root).items():
            for n in (int(v) for v in args.seqs.split(",")):
                r = results.setdefault(name, {})[n] = run(path, args.window, n)
                print(f"| {name} | {n} | {r['peak_blocks']} | {r['blocks_at_4x']} | {r['kv_mib_at_4x_tiny']:.1f} "
                      f"| {r['kv_mib_at_4x_mistral7b']:.0f} | {r['decode_ms_last_window']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
