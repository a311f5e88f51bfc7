"""Host cost per generated token: the engine's Python work, with the model's arithmetic made negligible.

    python benchmarks/host_overhead.py [--seqs 1,64,256] [--lens 200,4000] [--repeats 3]
        [--revisions BASE,HEAD] [--profile SEQS:LEN] [--first-block-attention] [--json out.json]

The model is a random 1-layer Llama 64 wide (8 query heads, one KV head) with a 1,024-token
vocabulary (the bundled tokenizer's first 1,024 tokens), so a step's time is the engine's own: scheduling, input
tensors, sampling, detokenizing, stop checks, building outputs. Workload: SEQS requests at
once through the offline `LLM.generate`, 8-token prompts, exactly LEN tokens each (EOS ignored),
temperature 0.8, every fourth request seeded. Reported, in microseconds per generated token,
median over --repeats (after one warm-up): `us_per_token`, wall time / generated tokens, and
`host_us_per_token`, the same less the time inside the model's forward pass (timed around
`llm.engine.runner.model.forward`; on CPU the kernels run synchronously): at 4,000 tokens of
context even this model's attention reads megabytes a step, which is not host work.

--first-block-attention makes decode attention read only each sequence's first KV block (the
tokens are then meaningless, the host's work the same): what is left of the growth from 200- to
4,000-token outputs is the host's own, without the attention's memory traffic, which evicts the
host's data from the CPU caches at every step.

--revisions BASE,HEAD checks both revisions out into git worktrees and runs this script on each
in turn (alternating every repeat), so the two are measured side by side. --profile prints
cProfile's top functions for one configuration.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One KV head of 8: 64 bytes of cache a token, so that even 64 sequences of 4,000 tokens (16 MB)
# do not flush the host's data from the CPU caches at every step.
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
             num_key_value_heads=1, vocab_size=1024, max_position_embeddings=8192, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2)


def model_dir() -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine import bundled_model_dir

    path = tempfile.mkdtemp(prefix="kvserve-host-")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(path)
    return path


def attend_first_block_only() -> None:
    """Every decode backend attends to each sequence's first block alone (--first-block-attention)."""
    import dataclasses

    from engine.layers.attention import DECODE_BACKENDS

    for backend in DECODE_BACKENDS.values():
        def decode(q, kv_cache, inputs, scale, softcap=None, full=backend.decode):
            first = dataclasses.replace(
                inputs, block_tables=inputs.block_tables[:, :1].contiguous(),
                context_lens=None if inputs.context_lens is None else inputs.context_lens.clamp(max=1),
                key_mask=None if inputs.key_mask is None else inputs.key_mask[..., :1].contiguous())
            return full(q, kv_cache, first, scale, softcap)

        backend.decode = decode


def measure(path: str, seqs: int, length: int, repeats: int, profile: bool = False) -> list[float]:
    from engine import LLM, SamplingParams

    blocks = seqs * (-(-(length + 8) // 16) + 1) + 16
    llm = LLM(path, max_num_seqs=seqs, max_model_len=length + 16, num_kv_blocks=blocks,
              max_num_batched_tokens=max(2048, 8 * seqs))
    prompts = [[3 + (i * 7 + j) % 1000 for j in range(8)] for i in range(seqs)]

    def params(i: int):
        return SamplingParams(temperature=0.8, max_tokens=length, ignore_eos=True, seed=i if i % 4 == 0 else None)

    model = llm.engine.runner.model
    forward, in_model = model.forward, [0.0]

    def timed_forward(*args, **kwargs):
        t = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            in_model[0] += time.perf_counter() - t

    model.forward = timed_forward
    llm.generate(prompts, [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)] * seqs)  # warm-up
    out = []
    for _ in range(repeats):
        in_model[0] = 0.0
        t0 = time.perf_counter()
        if profile:
            prof = cProfile.Profile()
            results = prof.runcall(llm.generate, prompts, [params(i) for i in range(seqs)])
        else:
            results = llm.generate(prompts, [params(i) for i in range(seqs)])
        elapsed = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
        assert tokens == seqs * length, tokens
        out.append((elapsed / tokens * 1e6, (elapsed - in_model[0]) / tokens * 1e6))
        if profile:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def run_here(args) -> dict:
    path = args.model_dir or model_dir()
    if args.first_block_attention:
        attend_first_block_only()
    if args.profile:
        seqs, length = (int(x) for x in args.profile.split(":"))
        measure(path, seqs, length, 1, profile=True)
        return {}
    results = {}
    for seqs in [int(x) for x in args.seqs.split(",")]:
        for length in [int(x) for x in args.lens.split(",")]:
            runs = measure(path, seqs, length, args.repeats)
            results[f"{seqs}x{length}"] = {
                "us_per_token": round(statistics.median(w for w, _ in runs), 2),
                "host_us_per_token": round(statistics.median(h for _, h in runs), 2),
                "runs": [[round(w, 2), round(h, 2)] for w, h in runs]}
            print(f"  seqs={seqs} len={length}: {results[f'{seqs}x{length}']}", flush=True)
    return results


def run_revisions(args) -> dict:
    """This script, run from a worktree of each revision in turn, one repeat at a time."""
    revs = args.revisions.split(",")
    out: dict[str, dict] = {rev: {} for rev in revs}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: Path(tmp) / f"tree{i}" for i, rev in enumerate(revs)}
        path = model_dir()  # built here: the same weights for each, and older trees may lack the export
        for rev, tree in trees.items():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                           check=True, capture_output=True)
        try:
            for r in range(args.repeats):
                for rev in revs if r % 2 == 0 else revs[::-1]:
                    res = Path(tmp) / "one.json"
                    cmd = [sys.executable, __file__, "--seqs", args.seqs, "--lens", args.lens, "--repeats", "1",
                           "--model-dir", path, "--json", str(res)]
                    env = {**os.environ, "PYTHONPATH": str(trees[rev])}
                    print(f"repeat {r}, {rev}:", flush=True)
                    subprocess.run(cmd, check=True, env=env, cwd=trees[rev])
                    for key, value in json.loads(res.read_text())["results"].items():
                        out[rev].setdefault(key, []).extend(value["runs"])
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"| seqs x len | wall {' / '.join(revs)} | ratio | host {' / '.join(revs)} | ratio |")
    print("|---|---|---|---|---|")
    summary = {rev: {} for rev in revs}
    for key in out[revs[0]]:
        for rev in revs:
            summary[rev][key] = {"us_per_token": statistics.median(w for w, _ in out[rev][key]),
                                 "host_us_per_token": statistics.median(h for _, h in out[rev][key]),
                                 "runs": out[rev][key]}
        wall = [summary[rev][key]["us_per_token"] for rev in revs]
        host = [summary[rev][key]["host_us_per_token"] for rev in revs]
        print(f"| {key} | {' / '.join(f'{m:.1f}' for m in wall)} | {wall[-1] / wall[0]:.3f} | "
              f"{' / '.join(f'{m:.1f}' for m in host)} | {host[-1] / host[0]:.3f} |")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1,64,256")
    ap.add_argument("--lens", default="200,4000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--revisions")
    ap.add_argument("--profile")
    ap.add_argument("--first-block-attention", action="store_true",
                    help="decode attention reads only each sequence's first block (not with --revisions)")
    ap.add_argument("--model-dir", help="a model made by an earlier run (default: make one)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = run_revisions(args) if args.revisions else run_here(args)
    if args.json:
        import engine

        args.json.write_text(json.dumps({"engine": engine.__file__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
