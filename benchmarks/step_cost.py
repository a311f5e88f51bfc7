"""What one forward pass costs by the number of tokens in it, the price of each draft token.

    python benchmarks/step_cost.py [--tokens 1,2,4,8,16,32,64] [--repeats 7]

Each measurement is a one-token generation from a prompt of T tokens (a pass over T rows, and
the engine's step around it), prefix caching off; the second fastest of the repeats, in ms.
Speculation buys steps with rows: on a machine where rows past the first cost little (a GPU at
small batch), drafts are nearly free; where each row costs a good part of a step (a CPU that is
already compute bound at a few rows), only drafts that are mostly kept pay.
"""
from __future__ import annotations

import argparse
import time

from engine import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,2,3,4,5,8,12,16,24,32,48,64")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    llm = LLM(enable_prefix_caching=False)
    print("| tokens in the pass | ms | / 1 token |\n|---|---|---|")
    base = None
    for t in (int(x) for x in args.tokens.split(",")):
        times = []
        for r in range(args.repeats):
            prompt = [(100 + 7 * i + r) % 40000 for i in range(t)]  # a different prompt each repeat
            start = time.perf_counter()
            llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
            times.append(time.perf_counter() - start)
        ms = 1000 * sorted(times)[min(1, len(times) - 1)]
        base = base or ms
        print(f"| {t} | {ms:.1f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
