"""Offline throughput: the same requests through kvserve's LLM.generate and HF generate().

    python benchmarks/offline_throughput.py [--num-requests 64] [--input-len 64] [--output-len 128]
                                            [--hf-batch-size 16] [--mixed] [--skip-hf] [--json out.json]
                                            [--dtypes float32,bfloat16] [--attention-backends auto,torch]

Every request gets a distinct ~input-len-token prompt cut from a fixed text. By default every
request generates exactly --output-len tokens (EOS ignored, min_new_tokens in HF); with --mixed
the lengths are spread over 16..256 with a fixed seed, and HF runs each static batch to the
longest request in it (as a static batch must) while only the wanted tokens are counted.
kvserve runs once per --dtypes and --attention-backends pair (float32 and auto are the defaults;
torch is the eager reference attention); HF runs in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch

from engine import LLM, SamplingParams, bundled_model_dir

TEXT = ("A river runs through the valley, past orchards and old stone mills, carrying snow melt from the "
        "mountains to the sea. Travellers have followed it for centuries, trading wool, salt and stories. ")


def make_prompts(tokenizer, n: int, input_len: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT * (input_len // 10 + 8))
    return [[tokenizer.encode(f"Request {i}:")[0]] + ids[i % 50:i % 50 + input_len - 1] for i in range(n)]


def output_lens(n: int, output_len: int, mixed: bool) -> list[int]:
    if not mixed:
        return [output_len] * n
    rng = random.Random(0)
    return [rng.randint(16, 256) for _ in range(n)]


def run_kvserve(model_dir, prompts, lens, args, linear_backend: str = "auto",
                dtype: str = "float32", attention_backend: str = "auto") -> tuple[float, int]:
    llm = LLM(str(model_dir), max_num_seqs=args.max_num_seqs, linear_backend=linear_backend, dtype=dtype,
              attention_backend=attention_backend)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lens]
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def load_hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_generate_batch(model, batch: list[list[int]], new_tokens: int) -> None:
    """One static batch, left padded, greedy, exactly new_tokens tokens each."""
    pad = model.generation_config.eos_token_id
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=pad)


def run_hf(model_dir, prompts, lens, batch_size: int) -> tuple[float, int]:
    model = load_hf(model_dir)
    start = time.perf_counter()
    produced = 0
    for b in range(0, len(prompts), batch_size):
        want = lens[b:b + batch_size]
        hf_generate_batch(model, prompts[b:b + batch_size], max(want))  # a static batch runs to its longest
        produced += sum(want)
    return time.perf_counter() - start, produced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--mixed", action="store_true", help="output lengths spread over 16..256")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--with-reference", action="store_true",
                    help="also run kvserve with linear_backend=torch (the plain nn.Linear reference path)")
    ap.add_argument("--dtypes", default="float32", help="comma-separated kvserve dtypes, each run in turn")
    ap.add_argument("--attention-backends", default="auto", help="comma-separated kvserve attention backends")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    model_dir = bundled_model_dir()
    from transformers import AutoTokenizer

    prompts = make_prompts(AutoTokenizer.from_pretrained(model_dir), args.num_requests, args.input_len)
    lens = output_lens(args.num_requests, args.output_len, args.mixed)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
              "model": f"SmolLM2-135M-Instruct (kvserve {args.dtypes}; HF float32)", "requests": args.num_requests,
              "input_len": args.input_len, "output_lens": "16..256 mixed" if args.mixed else args.output_len}
    for dtype in args.dtypes.split(","):
        for backend in args.attention_backends.split(","):
            t, n = run_kvserve(model_dir, prompts, lens, args, dtype=dtype, attention_backend=backend)
            key = "kvserve" + ("" if dtype == "float32" else f"_{dtype}") + ("" if backend == "auto" else f"_{backend}")
            result[key] = {"seconds": round(t, 2), "tokens": n, "tok_per_s": round(n / t, 1)}
            print(f"kvserve LLM.generate ({dtype}, attention {backend}, max_num_seqs={args.max_num_seqs}): "
                  f"{n} tokens in {t:.1f} s = {n / t:.1f} tok/s")
    if args.with_reference:
        t, n = run_kvserve(model_dir, prompts, lens, args, linear_backend="torch")
        result["kvserve_reference_linear"] = {"seconds": round(t, 2), "tokens": n, "tok_per_s": round(n / t, 1)}
        print(f"kvserve, linear_backend=torch (reference): {n} tokens in {t:.1f} s = {n / t:.1f} tok/s")
    if not args.skip_hf and "kvserve" in result:
        t, n = run_hf(model_dir, prompts, lens, args.hf_batch_size)
        result["hf"] = {"seconds": round(t, 2), "tokens": n, "tok_per_s": round(n / t, 1),
                        "batch_size": args.hf_batch_size}
        print(f"HF generate (static batches of {args.hf_batch_size}): {n} tokens in {t:.1f} s = {n / t:.1f} tok/s")
        ratio = result["kvserve"]["tok_per_s"] / result["hf"]["tok_per_s"]
        result["ratio"] = round(ratio, 2)
        print(f"kvserve / HF = {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
