"""Peer: Hugging Face transformers `generate()` in static batches (the offline baseline).

    python benchmarks/peers/hf_generate.py --prompts prompts.json --batch-size 16 --output-len 128

Runs the prompts (a JSON list of strings) in batches of --batch-size, left padded, greedy,
exactly --output-len new tokens each (min_new_tokens). Prints one JSON line: output tok/s over
the whole run and TTFT, taken as the time a batch needs to return its first token (a request
in a static batch sees nothing before that).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from offline_throughput import hf_generate_batch, load_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory (float32)")
    ap.add_argument("--prompts", required=True, help="JSON file with a list of prompt strings")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = load_hf(args.model)
    with open(args.prompts) as f:
        prompts = [tok.encode(p) for p in json.load(f)]
    hf_generate_batch(model, prompts[:1], 4)  # warm-up
    batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    start = time.perf_counter()
    for batch in batches:
        hf_generate_batch(model, batch, args.output_len)
    elapsed = time.perf_counter() - start
    ttfts = []
    for batch in batches:
        t = time.perf_counter()
        hf_generate_batch(model, batch, 1)
        ttfts.append(time.perf_counter() - t)
    print(json.dumps({"output_tok_per_s": round(len(prompts) * args.output_len / elapsed, 2),
                      "ttft_ms": {"p50": round(sorted(ttfts)[len(ttfts) // 2] * 1000, 1)},
                      "duration_s": round(elapsed, 2)}))


if __name__ == "__main__":
    main()
