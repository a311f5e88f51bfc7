"""Serving throughput of two git revisions of kvserve, side by side in one run.

    python benchmarks/ab_revisions.py --base REV [--head REV] [--levels 16,32] [--repeats 3]

Each revision is checked out into a temporary git worktree and served from there (`python -m
server serve`, with this checkout's .venv); the two take turns, once per repeat, on compare.py's
workload (random 64-token prompts, 128 output tokens, greedy, streamed; at concurrency C, max(C, 4)
requests with at most C in flight, after one warm-up). Prints per level the median output tok/s
and TTFT p50 of each revision and the ratio head / base; --json keeps every run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from compare import PORT, ROOT, start, stop
from serve import Workload, benchmark, load_tokenizer, make_prompts, served_model

HERE = Path(__file__).resolve().parent


def measure(tree: Path, prompts: list[str], levels: list[int], log: Path) -> dict[int, dict]:
    proc = start([str(ROOT / ".venv/bin/python"), "-m", "server", "serve", "--port", str(PORT)], log, cwd=tree)
    try:
        base = f"http://127.0.0.1:{PORT}"
        model, out = served_model(base), {}
        for c in levels:
            w = Workload(base, model, prompts[1:max(c, 4) + 1], 128, max_concurrency=c, ignore_eos=False,
                         warmup_prompt=prompts[0])
            s = benchmark(w, warmup=1)
            out[c] = {"output_tok_per_s": s["output_tok_per_s"], "ttft_p50_ms": s["ttft_ms"]["p50"],
                      "failed": s["failed"]}
            print(f"  {tree.name} c={c}: {out[c]}", flush=True)
        return out
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--levels", default="16,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tokenizer = load_tokenizer(None)
    runs: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("base", args.base), ("head", args.head)):
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees[name]), rev],
                           check=True, capture_output=True)
        try:
            for r in range(args.repeats):
                prompts = make_prompts(tokenizer, "random", max(levels) + 1, 64, 0, seed=r)
                for name in ("base", "head") if r % 2 == 0 else ("head", "base"):
                    runs[name].append(measure(trees[name], prompts, levels, Path(tmp) / f"{name}-{r}.log"))
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"| C | {args.base} tok/s | {args.head} tok/s | ratio | TTFT p50 ms base / head |")
    print("|---|---|---|---|---|")
    for c in levels:
        med = {n: statistics.median(run[c]["output_tok_per_s"] for run in runs[n]) for n in runs}
        ttft = {n: statistics.median(run[c]["ttft_p50_ms"] for run in runs[n]) for n in runs}
        print(f"| {c} | {med['base']:.1f} | {med['head']:.1f} | {med['head'] / med['base']:.3f} | "
              f"{ttft['base']:.0f} / {ttft['head']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "head": args.head, "runs": runs}, indent=1))

if __name__ == "__main__":
    main()
