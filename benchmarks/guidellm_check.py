"""guidellm's streaming benchmark against a running kvserve, offline, as a vLLM user runs it.

guidellm (`pip install guidellm`, 0.8.x; a venv of its own: it brings its own torch) sends what
it sends to vLLM: chat completions with `stream_options: {include_usage, continuous_usage_stats}`,
`max_completion_tokens` and `ignore_eos`. Its sweep profile (the quick start's) runs one benchmark
synchronously, one at up to 512 concurrent requests, then constant rates between the two, each for
--seconds. The tokenizer comes from the model's directory (no hub); the data are synthetic.

    make serve                                   # in another shell
    python benchmarks/guidellm_check.py --guidellm /path/to/venv/bin/guidellm \
        --model-dir ~/.cache/kvserve/models/SmolLM2-135M-Instruct-v1 --json benchmarks/results/guidellm.json

Prints one row per benchmark (requests ok / incomplete / errored, throughput, median TTFT and
ITL) and exits 1 if any request errored.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile


def command(args: argparse.Namespace, out_dir: str) -> list[str]:
    profile = {"kind": args.profile}
    if args.profile == "sweep":
        profile["sweep_size"] = args.sweep_size
    prompt, output = args.tokens.split(",")
    options = {
        "--backend": {"kind": "openai_http", "target": f"http://127.0.0.1:{args.port}"},
        "--profile": profile,
        "--constraint": {"kind": "max_duration", "seconds": args.seconds},
        "--data": {"kind": "synthetic_text", "prompt_tokens": int(prompt), "output_tokens": int(output)},
        "--tokenizer": {"kind": "huggingface_auto", "model": os.path.abspath(os.path.expanduser(args.model_dir))},
        "--output": {"kind": "json", "path": os.path.join(out_dir, "benchmarks.json")},
    }
    return [args.guidellm, "run", *[x for flag, v in options.items() for x in (flag, json.dumps(v))],
            "--disable-progress"]


def _successful(metrics: dict, name: str, stat: str = "median") -> float:
    return (metrics.get(name) or {}).get("successful", {}).get(stat) or 0.0


def summarize(report: dict) -> tuple[list[dict], int, collections.Counter]:
    rows, errored, errors = [], 0, collections.Counter()
    for b in report["benchmarks"]:
        m, strategy = b["metrics"], b["config"]["strategy"]
        totals = m["request_totals"]

        def ok(name: str, stat: str = "median", m=m) -> float:
            return _successful(m, name, stat)

        rows.append({"strategy": strategy.get("type_", "?") + (f"@{strategy['rate']:.2f}" if strategy.get("rate")
                                                                else ""),
                     "seconds": round(b["duration"], 1), "ok": totals["successful"],
                     "incomplete": totals["incomplete"], "errored": totals["errored"],
                     "requests_per_s": round(ok("requests_per_second", "mean"), 2),
                     "output_tok_per_s": round(ok("output_tokens_per_second", "mean"), 1),
                     "ttft_p50_ms": round(ok("time_to_first_token_ms"), 1),
                     "itl_p50_ms": round(ok("inter_token_latency_ms"), 1)})
        errored += totals["errored"]
        errors.update((r.get("info") or {}).get("error") or "?" for r in b["requests"].get("errored") or [])
    return rows, errored, errors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guidellm", default="guidellm", help="the guidellm executable")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-dir", required=True, help="the served model's directory (its tokenizer)")
    p.add_argument("--seconds", type=float, default=60.0, help="each benchmark's duration")
    p.add_argument("--profile", default="sweep", help="sweep, synchronous, throughput, ...")
    p.add_argument("--sweep-size", type=int, default=10)
    p.add_argument("--tokens", default="256,128", help="prompt and output tokens of each request")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = command(args, out_dir)
        print("+", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, cwd=out_dir, env=env, check=False)
        path = os.path.join(out_dir, "benchmarks.json")
        if run.returncode != 0 or not os.path.exists(path):
            print(f"guidellm failed (exit {run.returncode}) and wrote no report", file=sys.stderr)
            return run.returncode or 1
        with open(path) as f:
            rows, errored, errors = summarize(json.load(f))
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    for text, n in errors.most_common(5):
        print(f"  {n} x {text}")
    print(f"errored_requests={errored}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd[1:], "rows": rows, "errored": errored}, f, indent=1)
    return 1 if errored else 0


if __name__ == "__main__":
    raise SystemExit(main())
