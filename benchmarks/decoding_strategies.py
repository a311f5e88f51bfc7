"""Beam search and contrastive search against transformers with the same settings, in the same
run, and the KV blocks a beam group holds against k independent copies.

    python benchmarks/decoding_strategies.py [--levels 1,8] [--beams 4] [--top-k 4] [--alpha 0.6]
        [--max-tokens 64] [--repeats 3] [--strategies beam,contrastive] [--json out.json]

C prompts at once (general chat prompts, greedy beams, length_penalty 1, early_stopping False;
the same token ids to both). kvserve: the offline engine, one `LLM.generate` call for the C
requests. transformers: `generate(num_beams=k)` on the C prompts as one left-padded batch, float32,
its own KV cache. Reported: output tokens/s (returned tokens of the best beam of each request over
the wall time; median of the repeats), the ratio, and the peak KV blocks of one group (C=1)
against what k copies of its sequences would hold (sum of its beams' table lengths).

Contrastive search left transformers' core for a Hub repository that cannot be fetched here, so its
transformers side is a loop written below on transformers' own forward and KV cache, as that
repository does it: each step one forward of the k candidates over the cache repeated k times, then
the chosen row's cache kept; one prompt at a time (C prompts one after another). The script checks
that its tokens equal kvserve's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from speculative import GENERAL  # (benchmarks/ is on the path when a script in it runs)
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.models.loader import bundled_model_dir

# the general chat prompts of the speculative benchmark, and two more
PROMPTS = GENERAL + ["How do plants make their food?", "What should I pack for a weekend hike?"]


def chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def run_kvserve(llm: LLM, prompts: list[list[int]], k: int, max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(use_beam_search=True, temperature=0.0, best_of=k, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def run_hf(model, prompts: list[list[int]], k: int, max_tokens: int, pad: int) -> tuple[float, int]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, num_beams=k,
                             length_penalty=1.0, early_stopping=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    new = out[:, width:].tolist()
    return elapsed, sum(next((i + 1 for i, t in enumerate(row) if t == pad), len(row)) for row in new)


def run_kvserve_contrastive(llm: LLM, prompts, k: int, alpha: float, max_tokens: int):
    params = SamplingParams(penalty_alpha=alpha, top_k=k, temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def hf_contrastive(model, prompt: list[int], k: int, alpha: float, max_tokens: int, eos: set[int]) -> list[int]:
    with torch.no_grad():
        o = model(torch.tensor([prompt]), use_cache=True, output_hidden_states=True)
        cache, context, logits = o.past_key_values, o.hidden_states[-1][0], o.logits[0, -1].float()
        out = []
        for _ in range(max_tokens):
            top_p, top_ids = logits.softmax(-1).topk(k)
            cache.batch_repeat_interleave(k)
            o = model(top_ids.view(k, 1), past_key_values=cache, use_cache=True, output_hidden_states=True)
            h = o.hidden_states[-1][:, -1]  # [k, H]
            cos = (h / h.norm(dim=-1, keepdim=True)) @ (context / context.norm(dim=-1, keepdim=True)).T
            best = int(((1 - alpha) * top_p - alpha * cos.max(dim=-1).values).argmax())
            cache = o.past_key_values
            cache.batch_select_indices(torch.tensor([best]))
            out.append(int(top_ids[best]))
            if out[-1] in eos:
                break
            context, logits = torch.cat([context, h[best:best + 1]]), o.logits[best, -1].float()
    return out


def run_hf_contrastive(model, prompts, k: int, alpha: float, max_tokens: int, eos: set[int]):
    start = time.perf_counter()
    outs = [hf_contrastive(model, p, k, alpha, max_tokens, eos) for p in prompts]
    return time.perf_counter() - start, outs


def group_blocks(model_dir: str, prompt: list[int], k: int, max_tokens: int) -> tuple[int, int]:
    """Peak blocks a group holds (shared counted once) and what its beams' tables add up to then."""
    engine = LLMEngine(EngineConfig(model=model_dir))
    engine.add_request("b", prompt, SamplingParams(use_beam_search=True, temperature=0.0, best_of=k,
                                                   max_tokens=max_tokens))
    peak = (0, 0)
    while engine.has_unfinished_requests():
        engine.step()
        tables = [engine.kv.block_ids(f"b#{i}") for i in range(k)]
        peak = max(peak, (len({b for t in tables for b in t}), sum(map(len, tables))))
    return peak


def _row(strategy: str, c: int, ours: list[float], theirs: list[float]) -> dict:
    row = {"strategy": strategy, "C": c, "kvserve_tok_s": statistics.median(ours),
           "hf_tok_s": statistics.median(theirs)}
    row["ratio"] = row["kvserve_tok_s"] / row["hf_tok_s"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--strategies", default="beam,contrastive")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    model_dir = str(bundled_model_dir())
    llm = LLM(model_dir)
    tokenizer = llm.engine.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = sorted(llm.engine.eos_token_ids)[0]
    rows = []
    strategies = args.strategies.split(",")
    for c in map(int, args.levels.split(",")):
        prompts = [chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(c)]
        if "beam" in strategies:
            run_kvserve(llm, prompts[:1], args.beams, 4)  # warm-up
            ours, theirs = [], []
            for _ in range(args.repeats):  # alternating, so drift on a shared machine hits both alike
                t, n = run_kvserve(llm, prompts, args.beams, args.max_tokens)
                ours.append(n / t)
                t, n = run_hf(hf, prompts, args.beams, args.max_tokens, pad)
                theirs.append(n / t)
            rows.append(_row(f"beam k={args.beams}", c, ours, theirs))
        if "contrastive" in strategies:
            ours, theirs = [], []
            for _ in range(args.repeats):
                t, got = run_kvserve_contrastive(llm, prompts, args.top_k, args.alpha, args.max_tokens)
                ours.append(sum(map(len, got)) / t)
                t, want = run_hf_contrastive(hf, prompts, args.top_k, args.alpha, args.max_tokens,
                                             llm.engine.eos_token_ids)
                theirs.append(sum(map(len, want)) / t)
                assert got == want, "kvserve's contrastive search and the transformers loop disagree"
            rows.append(_row(f"contrastive k={args.top_k} alpha={args.alpha}", c, ours, theirs))
    held, copies = group_blocks(model_dir, chat_ids(tokenizer, PROMPTS[2]), args.beams, args.max_tokens)
    blocks = {"beams": args.beams, "group_blocks_peak": held, "independent_copies": copies}
    print(json.dumps(blocks), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "blocks": blocks, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
