"""kvserve against its peers on this machine, in one run (`make bench`).

    python benchmarks/compare.py [--levels 1,4,16,32,64] [--repeats 3] [--systems ...] [--out DIR]

Workload (issue 4): random prompts of 64 tokens, 128 output tokens, greedy, streamed; at each
concurrency C, max(C, 4) requests go out at once with at most C in flight. Every server gets the
same prompts and none is asked to ignore EOS (transformers serve rejects `ignore_eos`); the
random prompts make all of them run to 128 tokens, and the token counts that came back are
what is counted. Systems:
  kvserve             `kvserve serve` (float32, prefix caching on, as shipped: token-exact)
  kvserve-bf16        `kvserve serve --dtype bfloat16` (opt-in, half the weight bytes; not token-exact)
  transformers-serve  benchmarks/peers/transformers_serve.sh (float32, continuous batching)
  llama.cpp           benchmarks/peers/llama_cpp.sh (Q4_1 GGUF, 64 parallel slots; needs `build`)
  hf-generate         benchmarks/peers/hf_generate.py (float32 generate() in static batches of C)
Then, for kvserve only: Poisson arrivals at 80% of its measured peak request rate (ITL p50/p99),
and a shared 512-token prefix: TTFT of the first request of a prefix (cold) and the next ones (warm).
Writes DIR/compare.json, DIR/compare.md (tables) and DIR/compare.png (plot).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from serve import Workload, benchmark, load_tokenizer, make_prompts, run

from engine import bundled_model_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PORT = 8765


def server_command(system: str) -> list[str] | None:
    if system in ("kvserve", "kvserve-bf16"):
        dtype = ["--dtype", "bfloat16"] if system == "kvserve-bf16" else []
        return [str(ROOT / ".venv/bin/kvserve"), "serve", "--port", str(PORT), *dtype]
    if system == "transformers-serve":
        return [str(HERE / "peers/transformers_serve.sh"), str(PORT)]
    if system == "llama.cpp":
        if not (HERE / ".peers/llama_cpp/build/bin/llama-server").exists():
            print("llama.cpp: not built; run `benchmarks/peers/llama_cpp.sh build` (~10 min) first", flush=True)
            return None
        return [str(HERE / "peers/llama_cpp.sh"), "serve", str(PORT), "64"]
    raise ValueError(system)


def start(cmd: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise RuntimeError(f"{cmd[0]} did not come up in 10 minutes; see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def model_name(system: str) -> str:
    if system == "transformers-serve":
        return str(bundled_model_dir())
    return httpx.get(f"http://127.0.0.1:{PORT}/v1/models", timeout=30).json()["data"][0]["id"]


def median_of(runs: list[dict], *path: str) -> float:
    values = []
    for r in runs:
        for key in path:
            r = r[key]
        values.append(r)
    return round(statistics.median(values), 2)


def sweep(system: str, prompt_sets: list[list[str]], args, log_dir: Path) -> dict:
    """Every concurrency level, once per prompt set (levels interleaved so drift hits all alike)."""
    runs: dict[int, list[dict]] = {c: [] for c in args.levels}
    if system == "hf-generate":
        for prompts in prompt_sets:
            for c in args.levels:
                runs[c].append(hf_generate(prompts[1:max(c, 4) + 1], c, args.output_len))
                print(f"  hf-generate batch {c}: {runs[c][-1]['output_tok_per_s']} tok/s", flush=True)
        return {"runs": runs}
    cmd = server_command(system)
    if cmd is None:
        return {"skipped": "not built"}
    proc = start(cmd, log_dir / f"{system}.log")
    try:
        name = model_name(system)
        for prompts in prompt_sets:
            for c in args.levels:
                # prompts[0] only warms up: no measured prompt has been seen by a prompt cache
                w = Workload(f"http://127.0.0.1:{PORT}", name, prompts[1:max(c, 4) + 1], args.output_len,
                             max_concurrency=c, ignore_eos=False, warmup_prompt=prompts[0])
                s = benchmark(w, warmup=1)
                s.pop("per_request")
                runs[c].append(s)
                print(f"  {system} c={c}: {s['output_tok_per_s']} tok/s, TTFT p50 {s['ttft_ms']['p50']} ms, "
                      f"{s['output_tokens']} tokens, {s['failed']} failed", flush=True)
        extra = kvserve_extras(name, runs, args) if system == "kvserve" else {}
    finally:
        stop(proc)
    return {"runs": runs, **extra}


def hf_generate(prompts: list[str], batch: int, output_len: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    out = subprocess.run([sys.executable, str(HERE / "peers/hf_generate.py"), "--model", str(bundled_model_dir()),
                          "--prompts", f.name, "--batch-size", str(batch), "--output-len", str(output_len)],
                         capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def kvserve_extras(name: str, runs: dict[int, list[dict]], args) -> dict:
    base = f"http://127.0.0.1:{PORT}"
    tok = load_tokenizer(None)
    # Poisson arrivals at 80% of the peak request rate measured above
    peak = median_of(runs[max(args.levels)], "request_per_s")
    rate = 0.8 * peak
    prompts = make_prompts(tok, "random", 65, args.input_len, 0, seed=1000)
    poisson = benchmark(Workload(base, name, prompts[1:], args.output_len, request_rate=rate, ignore_eos=False,
                                 warmup_prompt=prompts[0]))
    poisson.pop("per_request")
    poisson["request_rate"] = round(rate, 3)
    print(f"  kvserve Poisson {rate:.2f} req/s: ITL p50 {poisson['itl_ms']['p50']} p99 {poisson['itl_ms']['p99']} ms",
          flush=True)
    # shared prefix: per group, the first request finds nothing cached, the next ones the prefix
    cold, warm = [], []
    for group in range(5):
        ps = make_prompts(tok, "shared-prefix", 4, 64, 512, seed=100 + group)
        results, _ = asyncio.run(run(Workload(base, name, ps, 16, max_concurrency=1, ignore_eos=False)))
        cold.append(results[0].ttft * 1000)
        warm += [r.ttft * 1000 for r in results[1:]]
    shared = {"cold_ttft_ms_p50": round(statistics.median(cold), 1),
              "warm_ttft_ms_p50": round(statistics.median(warm), 1)}
    shared["speedup"] = round(shared["cold_ttft_ms_p50"] / shared["warm_ttft_ms_p50"], 2)
    print(f"  kvserve shared 512-token prefix: TTFT cold {shared['cold_ttft_ms_p50']} ms, "
          f"warm {shared['warm_ttft_ms_p50']} ms ({shared['speedup']}x)", flush=True)
    return {"poisson": poisson, "shared_prefix": shared}


def table(results: dict, levels: list[int]) -> str:
    lines = ["| system | " + " | ".join(f"C={c}" for c in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for metric, label in (("output_tok_per_s", "output tok/s"), ("ttft", "TTFT p50 ms")):
        for system, res in results.items():
            if "runs" not in res:
                continue
            cells = []
            for c in levels:
                if metric == "ttft":
                    cells.append(f"{median_of(res['runs'][c], 'ttft_ms', 'p50'):.0f}")
                else:
                    cells.append(f"{median_of(res['runs'][c], metric):.1f}")
            lines.append(f"| {system} — {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, res in results.items():
        if "runs" not in res:
            continue
        ax1.plot(levels, [median_of(res["runs"][c], "output_tok_per_s") for c in levels], marker="o", label=system)
        ax2.plot(levels, [median_of(res["runs"][c], "ttft_ms", "p50") for c in levels], marker="o", label=system)
    for ax, title in ((ax1, "output tokens/s (median of runs)"), (ax2, "TTFT p50, ms (log scale)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.suptitle("SmolLM2-135M-Instruct, 64-token prompts, 128 output tokens, "
                 f"{os.cpu_count()}-core {platform.machine()} CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,4,16,32,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default="kvserve,kvserve-bf16,llama.cpp,transformers-serve,hf-generate")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.levels.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = HERE / ".peers" / "logs"  # the servers' own output, not kept in git
    logs.mkdir(parents=True, exist_ok=True)

    # A fresh prompt set per repeat: prefix caches (kvserve's, llama.cpp's) never see a prompt twice.
    tok = load_tokenizer(None)
    prompt_sets = [make_prompts(tok, "random", max(max(args.levels), 4) + 1, args.input_len, 0, seed=r)
                   for r in range(args.repeats)]
    results = {}
    for system in args.systems.split(","):
        print(f"{system}:", flush=True)
        results[system] = sweep(system, prompt_sets, args, logs)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": "SmolLM2-135M-Instruct",
            "workload": f"random {args.input_len}-token prompts, {args.output_len} output tokens, greedy, streamed",
            "levels": args.levels, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    (out / "compare.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results, args.levels)
    kv = results.get("kvserve", {})
    if "poisson" in kv:
        p, s = kv["poisson"], kv["shared_prefix"]
        md += (f"\n\nkvserve, Poisson arrivals at {p['request_rate']} req/s (80% of peak): ITL p50 "
               f"{p['itl_ms']['p50']} ms, p99 {p['itl_ms']['p99']} ms "
               f"({p['itl_ms']['p99'] / p['itl_ms']['p50']:.2f}x); "
               f"TPOT p50 {p['tpot_ms']['p50']} ms; {p['output_tok_per_s']} tok/s.\n"
               f"kvserve, shared 512-token prefix: TTFT p50 cold {s['cold_ttft_ms_p50']} ms, warm "
               f"{s['warm_ttft_ms_p50']} ms ({s['speedup']}x).")
    (out / "compare.md").write_text(md + "\n")
    print(md)
    plot(results, args.levels, out / "compare.png")

if __name__ == "__main__":
    main()
