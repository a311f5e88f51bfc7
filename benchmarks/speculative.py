"""Speculative decoding against plain decoding: the offline engine (`LLM.generate`), the same
prompts, greedy, C requests at once (in waves of C, every prompt of the workload at least once),
each method and none alternating in one run.

    python benchmarks/speculative.py [--levels 1,8,32] [--repeats 3] [--max-tokens 128]
        [--methods ngram,ngram-always,lookahead,lookahead-w2,self-16,draft-target] [--json out.json]

Workloads: (a) copy/edit, chat prompts that ask to repeat, quote or lightly edit a passage or a
function (the answer reuses the prompt's text, where prompt lookup finds drafts); (b) general
chat prompts. Reported per workload, method and C: output tokens/s (median of the repeats) and
its ratio to none, the acceptance rate (accepted / proposed draft tokens), and the mean accepted
length (tokens a sequence gains per step it drafted: 1 + accepted / drafts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine import LLM, SamplingParams
from engine.models.loader import bundled_model_dir

PASSAGE = ("The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt and "
           "wind. Every evening the keeper climbed the spiral stairs, counted the one hundred and twelve steps, and "
           "lit the great lamp that warned ships away from the rocks below.")
CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
        "    return total / len(values)\n")
COPY_EDIT = [
    f"Repeat the following passage exactly:\n\n{PASSAGE}",
    f"Quote this paragraph word for word:\n\n{PASSAGE}",
    f"Rewrite this passage, changing 'lighthouse' to 'tower':\n\n{PASSAGE}",
    f"Copy this Python function and rename it to average:\n\n{CODE}",
    f"Repeat this code exactly:\n\n{CODE}",
    f"Add a docstring to this function:\n\n{CODE}",
]
GENERAL = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in simple terms.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Describe your favourite season and why.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# "ngram" as configured by default (no drafts from disable_by_batch_size running sequences on),
# "ngram-always" drafting at every batch size: where it stops paying is where the default lies
METHODS = {"ngram": NGRAM, "ngram-always": {**NGRAM, "disable_by_batch_size": None},
           "lookahead": {"method": "lookahead"}, "lookahead-w2": {"method": "lookahead", "window": 2},
           "self-16": {"method": "draft_model", "model": "self", "num_layers": 16, "num_speculative_tokens": 3},
           # the bundled model drafting for itself (a pool of its own): what the mechanism keeps when
           # every draft is right, and what a draft model as large as the target costs
           "draft-target": {"method": "draft_model", "model": str(bundled_model_dir()), "num_speculative_tokens": 3}}


def prompts_for(tokenizer, texts: list[str], count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}],
                                            add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if not isinstance(ids, list) else ids))
    return out


def run(llm: LLM, prompts: list[list[int]], c: int, max_tokens: int) -> dict:
    """The prompts, c at a time (each wave one generate call), greedy."""
    m = llm.engine.metrics
    counters = (m.draft_tokens, m.accepted_tokens, m.drafts) if m.speculative else ()
    before = [x._value.get() for x in counters]
    start = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), c):
        outs += llm.generate(prompts[i:i + c], SamplingParams(temperature=0, max_tokens=max_tokens))
    elapsed = time.perf_counter() - start
    drafted, accepted, drafts = ([x._value.get() - b for x, b in zip(counters, before)] if counters else (0, 0, 0))
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_per_s": tokens / elapsed, "tokens": tokens, "drafted": drafted, "accepted": accepted,
            "drafts": drafts, "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS), help="of " + ", ".join(METHODS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    engines = {"none": LLM()} | {name: LLM(speculative_config=METHODS[name]) for name in methods}
    tokenizer = engines["none"].get_tokenizer()
    workloads = {"copy/edit": COPY_EDIT, "general": GENERAL}
    results: dict = {}
    for r in range(args.repeats):
        for wname, texts in workloads.items():
            for c in levels:
                # every prompt at least once: c at a time, in waves
                prompts = prompts_for(tokenizer, texts, c * -(-len(texts) // c))
                names = list(engines) if r % 2 == 0 else list(engines)[::-1]
                for name in names:
                    res = run(engines[name], prompts, c, args.max_tokens)
                    results.setdefault(wname, {}).setdefault(str(c), {}).setdefault(name, []).append(res)
                    print(f"repeat {r} {wname} C={c} {name}: {res['tok_per_s']:.1f} tok/s", flush=True)
                # speculation must not change greedy output
                outs = {name: results[wname][str(c)][name][-1]["outputs"] for name in engines}
                assert all(o == outs["none"] for o in outs.values()), f"outputs differ: {wname} C={c}"
    print("| workload | C | none tok/s | method | tok/s | / none | acceptance | mean accepted length |")
    print("|---|---|---|---|---|---|---|---|")
    for wname, by_c in results.items():
        for c, by_name in by_c.items():
            none = statistics.median(x["tok_per_s"] for x in by_name["none"])
            for name in methods:
                runs = by_name[name]
                tps = statistics.median(x["tok_per_s"] for x in runs)
                drafted, accepted, drafts = (sum(x[k] for x in runs) for k in ("drafted", "accepted", "drafts"))
                rate = accepted / drafted if drafted else 0.0
                length = 1 + accepted / drafts if drafts else 1.0
                print(f"| {wname} | {c} | {none:.1f} | {name} | {tps:.1f} | {tps / none:.2f} | {rate:.2f} | "
                      f"{length:.2f} |")
    if args.json:
        for by_c in results.values():
            for by_name in by_c.values():
                for runs in by_name.values():
                    for x in runs:
                        x.pop("outputs")
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
