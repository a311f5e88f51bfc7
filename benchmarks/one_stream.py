"""One stream, offline: a decode step of the bundled model at batch 1, fused against per-op.

    python benchmarks/one_stream.py [--repeats 5] [--tokens 128] [--profile]

One 64-token prompt, 128 greedy tokens (EOS ignored) through `LLM.generate`, prefix caching off;
tok/s of the whole request, the prefill included. The engine runs its decode steps through one C++
call for every layer (`decode_layers=fused`, where the model allows it); the same engine with that
switched off runs them layer by layer, op by op. The two take turns, each repeat with a fresh
prompt, and the medians are printed side by side. --profile adds torch.profiler's table of one
fused request (where a step's time goes).
"""
from __future__ import annotations

import argparse
import statistics
import time

from engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    llm = LLM(enable_prefix_caching=False)
    model = llm.engine.runner.model
    fused = model.fused_weights
    print(llm.engine.describe(), flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate([5] * 64, params)  # warm-up
    runs: dict[str, list[float]] = {"fused": [], "per-op": []}
    for r in range(args.repeats):
        for name in runs if fused is not None else ["per-op"]:
            model.fused_weights = fused if name == "fused" else None
            prompt = [(100 + 7 * i + 31 * r) % 40000 for i in range(64)]
            start = time.perf_counter()
            llm.generate(prompt, params)
            runs[name].append(args.tokens / (time.perf_counter() - start))
    model.fused_weights = fused
    print("| decode step | tok/s (median) | runs |\n|---|---|---|")
    for name, values in runs.items():
        if values:
            print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate([(300 + 11 * i) % 40000 for i in range(64)], params)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
