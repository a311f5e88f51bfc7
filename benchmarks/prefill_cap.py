"""What `--max-prefill-tokens-while-decoding` trades: ITL p99 against TTFT and burst throughput.

    python benchmarks/prefill_cap.py [--caps 0,16,32] [--repeats 3] [--rate 2.16] [--out FILE]

For each repeat and each cap (caps interleaved, so drift of this machine hits all alike), a fresh
`kvserve serve --max-prefill-tokens-while-decoding CAP` (a fresh server: nothing in its prefix
cache) runs three workloads of compare.py's shape (64-token random prompts, 128 output tokens,
greedy, streamed), each on prompts of its own:
  burst16  16 requests at once, at most 16 in flight (the throughput comparison's C=16);
  burst64  64 requests at once, at most 64 in flight;
  poisson  64 requests, Poisson arrivals at --rate req/s (compare.py's: 80% of the peak, 2.16 in
           its fifth run), the ITL p99 / p50 workload.
Prints medians over the repeats and writes every run to --out (JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from compare import PORT, median_of, server_command, start, stop
from serve import Workload, benchmark, load_tokenizer, make_prompts, served_model

HERE = Path(__file__).resolve().parent

WORKLOADS = {  # name: (requests, max in flight, request rate)
    "burst16": (16, 16, float("inf")),
    "burst64": (64, 64, float("inf")),
    "poisson": (64, None, None),
}


def run_server(cap: int, rep: int, tok, args, log: Path) -> dict:
    cmd = server_command("kvserve") + ["--max-prefill-tokens-while-decoding", str(cap)]
    proc = start(cmd, log)
    results = {}
    try:
        base = f"http://127.0.0.1:{PORT}"
        name = served_model(base)
        for i, (wl, (num, conc, rate)) in enumerate(WORKLOADS.items()):
            prompts = make_prompts(tok, "random", num + 1, 64, 0, seed=10_000 * (rep + 1) + 100 * i)
            w = Workload(base, name, prompts[1:], 128, request_rate=rate or args.rate, max_concurrency=conc,
                         seed=rep, ignore_eos=False, warmup_prompt=prompts[0])
            s = benchmark(w)
            s.pop("per_request")
            results[wl] = s
            print(f"  cap {cap} rep {rep} {wl}: {s['output_tok_per_s']} tok/s, ITL p50 {s['itl_ms']['p50']} "
                  f"p99 {s['itl_ms']['p99']} mean {s['itl_ms']['mean']} ms, TTFT p50 {s['ttft_ms']['p50']} "
                  f"p99 {s['ttft_ms']['p99']} ms", flush=True)
    finally:
        stop(proc)
    return results


def summary(runs: list[dict]) -> dict:
    def med(wl, *path):
        return median_of([r[wl] for r in runs], *path)
    ratio = statistics.median(r["poisson"]["itl_ms"]["p99"] / r["poisson"]["itl_ms"]["p50"] for r in runs)
    return {"burst16_tok_per_s": med("burst16", "output_tok_per_s"),
            "burst64_tok_per_s": med("burst64", "output_tok_per_s"),
            "burst16_ttft_p99_ms": med("burst16", "ttft_ms", "p99"),
            "poisson_itl_ms": {k: med("poisson", "itl_ms", k) for k in ("mean", "p50", "p99")},
            "poisson_itl_p99_over_p50": round(ratio, 2),
            "poisson_ttft_ms": {k: med("poisson", "ttft_ms", k) for k in ("p50", "p99")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caps", default="0,16,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2.16, help="Poisson requests/s")
    ap.add_argument("--out", default=str(HERE / "results/prefill-cap.json"))
    args = ap.parse_args()
    caps = [int(c) for c in args.caps.split(",")]
    tok = load_tokenizer(None)
    runs: dict[int, list[dict]] = {c: [] for c in caps}
    logs = Path(tempfile.mkdtemp(prefix="kvserve-prefill-cap-"))
    print(f"server logs in {logs}", flush=True)
    for rep in range(args.repeats):
        for cap in caps:
            runs[cap].append(run_server(cap, rep, tok, args, logs / f"cap{cap}-{rep}.log"))
    out = {"rate": args.rate, "runs": runs, "medians": {c: summary(r) for c, r in runs.items()}}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| cap | burst C=16 tok/s | burst C=64 tok/s | burst C=16 TTFT p99 ms | Poisson ITL mean / p50 / p99 ms "
          "| p99 / p50 | Poisson TTFT p50 / p99 ms |\n|---|---:|---:|---:|---:|---:|---:|")
    for c, m in out["medians"].items():
        i, t = m["poisson_itl_ms"], m["poisson_ttft_ms"]
        print(f"| {c} | {m['burst16_tok_per_s']} | {m['burst64_tok_per_s']} | {m['burst16_ttft_p99_ms']} | "
              f"{i['mean']} / {i['p50']} / {i['p99']} | {m['poisson_itl_p99_over_p50']}× | {t['p50']} / {t['p99']} |")

if __name__ == "__main__":
    main()
