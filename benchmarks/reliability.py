"""Reliability under hostile and heavy use, against a real `kvserve serve` on loopback.

    python benchmarks/reliability.py [--parts load,fuzz,stall,soak] [--requests 1000] [--concurrency 64]
        [--drop 0.2] [--fuzz-seconds 240] [--fuzz-paths REGEX] [--soak-seconds 300] [--stall-repeats 5]
        [--json out.json]

Parts (RELIABILITY.md quotes the last run):
  load  --requests mixed requests, at most --concurrency in flight: greedy completions whose text
        must equal the same request sent alone, sampled chats and completions (n 1-2, streamed
        or not), requests that must get a 400, and a --drop share of streams the client drops
        after a few chunks. Counts: lost (no complete answer and no error), 5xx, greedy
        mismatches, and the KV blocks still held once the server is idle.
  fuzz  schemathesis (all checks) against /openapi.json for --fuzz-seconds (the routes
        --fuzz-paths matches, or all): server errors and the other check failures, by check.
  soak  --soak-seconds of steady mixed load at concurrency 8; the server's RSS sampled every
        5 s and its slope (MiB/min, least squares over the samples after the first minute).
  stall each big body below sent --stall-repeats times while /health is asked back to back: the
        longest and the median /health wait while it is in flight (each body ends in a 400).
The server runs with --max-model-len 512, as the issue asks for the fuzz run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from compare import PORT, ROOT, start, stop

HERE = Path(__file__).resolve().parent

BASE = f"http://127.0.0.1:{PORT}"
GREEDY_PROMPTS = ["The lighthouse keeper climbed the stairs and", "In spring the council voted to",
                  "The recipe for a good soup begins with", "Rivers carry water from the mountains to",
                  "A short history of the printing press:", "def fibonacci(n):", "Dear customer, we regret",
                  "The three laws of motion are"]
BAD_BODIES = [{"prompt": "x", "seed": 2**64}, {"prompt": "x", "top_k": 2**63}, {"prompt": "x", "n": 10**9},
              {"prompt": "x", "temperature": 1e308}, {"prompt": "x", "unknown_field": 1},
              {"prompt": "x", "stop": ["a"] * 50}, {"prompt": "x", "logit_bias": {"999999": 1}},
              {"prompt": "x", "max_tokens": 100000}, {"prompt": [10**12]}]

# --- load ----------------------------------------------------------------------------------
async def _complete(client: httpx.AsyncClient, body: dict, path: str = "/v1/completions") -> tuple[int, dict | None]:
    r = await client.post(path, json=body)
    return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else None)

async def _stream(client: httpx.AsyncClient, body: dict, path: str, drop_after: int | None) -> tuple[int, str]:
    """(status, outcome): outcome 'done' ([DONE] after a finish reason), 'dropped', 'error-chunk' or 'cut'."""
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, "http-error"
        chunks, finished = 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return 200, "done" if finished else "cut"
            data = json.loads(line[6:])
            if "error" in data:
                return 500, "error-chunk"
            finished = finished or any(c.get("finish_reason") for c in data["choices"])
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return 200, "dropped"
        return 200, "cut"


def _mix(n: int, drop: float, rng: random.Random) -> list[tuple[str, dict]]:
    kinds = rng.choices(["greedy", "sampled", "bad", "drop"], weights=[0.4, 0.4 - drop, 0.2, drop], k=n)
    jobs = []
    for kind in kinds:
        if kind == "greedy":
            jobs.append((kind, {"prompt_index": rng.randrange(len(GREEDY_PROMPTS)), "stream": rng.random() < 0.5}))
        elif kind == "sampled":
            jobs.append((kind, {"chat": rng.random() < 0.5, "n": rng.choice([1, 2]), "stream": rng.random() < 0.5}))
        elif kind == "bad":
            jobs.append((kind, {"body": rng.choice(BAD_BODIES)}))
        else:
            jobs.append((kind, {"after": rng.randint(1, 4)}))
    return jobs

async def _job(client, kind: str, spec: dict, references: list[str]) -> str:
    """The job's outcome: 'ok', 'mismatch', 'lost', '5xx' or 'wrong-status'."""
    try:
        if kind == "greedy":
            body = {"prompt": GREEDY_PROMPTS[spec["prompt_index"]], "max_tokens": 24, "temperature": 0}
            if spec["stream"]:
                return await _greedy_stream(client, body, references[spec["prompt_index"]])
            status, out = await _complete(client, body)
            if status >= 500:
                return "5xx"
            return "ok" if out["choices"][0]["text"] == references[spec["prompt_index"]] else "mismatch"
        if kind == "sampled":
            body = {"max_tokens": 16, "temperature": 0.8, "n": spec["n"]}
            path = "/v1/chat/completions" if spec["chat"] else "/v1/completions"
            body |= {"messages": [{"role": "user", "content": "Tell me about rivers."}]} if spec["chat"] else \
                {"prompt": "Rivers are"}
            if spec["stream"]:
                status, outcome = await _stream(client, body, path, None)
                return "5xx" if status >= 500 else ("ok" if outcome == "done" else "lost")
            status, out = await _complete(client, body, path)
            return "5xx" if status >= 500 else ("ok" if status == 200 and len(out["choices"]) == spec["n"] else "lost")
        if kind == "bad":
            status, _ = await _complete(client, spec["body"])
            return "5xx" if status >= 500 else ("ok" if status == 400 else "wrong-status")
        status, outcome = await _stream(client, {"prompt": "Once upon a time", "max_tokens": 200,
                                                 "ignore_eos": True}, "/v1/completions", spec["after"])
        return "5xx" if status >= 500 else ("ok" if outcome in ("dropped", "done") else "lost")
    except httpx.HTTPError as e:
        return f"lost ({type(e).__name__})"

async def _greedy_stream(client, body: dict, reference: str) -> str:
    text = ""
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code >= 500:
            return "5xx"
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if "error" in data:
                    return "5xx"
                text += data["choices"][0]["text"]
    return "ok" if text == reference else "mismatch"

async def _references(client) -> list[str]:
    """Each greedy prompt's text, sent alone before any load."""
    return [(await _complete(client, {"prompt": p, "max_tokens": 24, "temperature": 0}))[1]["choices"][0]["text"]
            for p in GREEDY_PROMPTS]

async def load(args) -> dict:
    async with httpx.AsyncClient(base_url=BASE, timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        references = await _references(client)
        jobs = _mix(args.requests, args.drop, random.Random(args.seed))
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(kind, spec):
            async with gate:
                return kind, await _job(client, kind, spec, references)

        t0 = time.monotonic()
        results = await asyncio.gather(*(gated(k, s) for k, s in jobs))
        elapsed = time.monotonic() - t0
    idle = _wait_idle()
    outcomes = Counter(outcome for _, outcome in results)
    return {"requests": len(jobs), "concurrency": args.concurrency, "seconds": round(elapsed, 1),
            "kinds": dict(Counter(k for k, _ in jobs)), "outcomes": dict(outcomes),
            "lost": sum(v for k, v in outcomes.items() if k.startswith("lost")), "5xx": outcomes["5xx"],
            "greedy_mismatches": outcomes["mismatch"], "wrong_status": outcomes["wrong-status"], **idle}


def _metrics() -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{BASE}/metrics", timeout=30).text.splitlines():
        if line.startswith("kvserve:") and "{" in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def _wait_idle(timeout: float = 60.0) -> dict:
    """Seconds until nothing runs or waits and no KV block is held; what is still held otherwise."""
    t0 = time.monotonic()
    while True:
        m = _metrics()
        busy = m["kvserve:num_requests_running"] + m["kvserve:num_requests_waiting"]
        if (busy == 0 and m["kvserve:kv_cache_usage_perc"] == 0) or time.monotonic() - t0 > timeout:
            return {"idle_after_s": round(time.monotonic() - t0, 2),
                    "kv_usage_after_idle": m["kvserve:kv_cache_usage_perc"],
                    "sequences_left": busy}
        time.sleep(0.2)

# --- fuzz ----------------------------------------------------------------------------------
def fuzz(args) -> dict:
    exe = Path(sys.executable).with_name("schemathesis")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(exe), "run", f"{BASE}/openapi.json", "--checks", "all", "--max-time", str(args.fuzz_seconds),
               "--request-timeout", "120", "--max-response-time", "120", "--workers", "2", "--seed", str(args.seed),
               "--report", "ndjson",
               "--report-dir", tmp, "--no-color"]
        if args.fuzz_paths:
            cmd += ["--include-path-regex", args.fuzz_paths]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, check=False)  # its cache stays in tmp
        elapsed = time.monotonic() - t0
        output = args.json.with_name(f"{args.json.stem}-schemathesis.txt")  # (reliability-schemathesis.txt)
        output.parent.mkdir(exist_ok=True)
        output.write_text(proc.stdout[-200_000:])
    return {"seconds": round(elapsed, 1), "exit_code": proc.returncode, **schemathesis_summary(proc.stdout),
            "output": str(output.resolve().relative_to(ROOT))}


def schemathesis_summary(text: str) -> dict:
    """Test cases generated and the failures by kind, from the summary schemathesis prints."""
    summary = text[text.rfind("SUMMARY"):]
    failures = {name.strip(): int(n) for name, n in re.findall(r"❌ (ST\d+ [^:\n]+): (\d+)", summary)}
    generated = re.search(r"(\d+) generated", summary)
    return {"test_cases": int(generated.group(1)) if generated else None, "failures": failures,
            "server_errors": sum(n for name, n in failures.items() if "server error" in name.lower())}

# --- stall ---------------------------------------------------------------------------------
STALL_BODIES = {"10 MB text prompt": ("/v1/completions", {"prompt": "x" * 10_000_000}),
                "1.4M token ids": ("/v1/completions", {"prompt": list(range(1_400_000))}),
                "1M short prompts": ("/v1/completions", {"prompt": ["ab"] * 1_000_000}),
                "1.4M bad token ids": ("/v1/completions", {"prompt": [-1] * 1_400_000}),
                "10 MB /tokenize": ("/tokenize", {"prompt": "x" * 10_000_000})}


def stall(args) -> dict:
    out = {}
    for name, (path, body) in STALL_BODIES.items():
        data, waits, statuses = json.dumps(body).encode(), [], Counter()
        for _ in range(args.stall_repeats):
            with ThreadPoolExecutor(1) as pool:
                sent = pool.submit(httpx.post, f"{BASE}{path}", content=data, timeout=300,
                                   headers={"content-type": "application/json"})
                while not sent.done():
                    t = time.perf_counter()
                    httpx.get(f"{BASE}/health", timeout=60)
                    waits.append(time.perf_counter() - t)
                statuses[sent.result().status_code] += 1
        out[name] = {"body_mb": round(len(data) / 1e6, 1), "statuses": dict(statuses), "health_probes": len(waits),
                     "health_max_s": round(max(waits), 3), "health_median_s": round(statistics.median(waits), 3)}
    return out

# --- soak ----------------------------------------------------------------------------------
def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

async def soak(args, pid: int) -> dict:
    rng = random.Random(args.seed + 1)
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + args.soak_seconds
    done = Counter()
    async with httpx.AsyncClient(base_url=BASE, timeout=300) as client:
        async def worker():
            while time.monotonic() < deadline:
                kind, spec = _mix(1, args.drop, rng)[0]
                done[await _job(client, kind, spec, refs)] += 1

        async def sampler():
            t0 = time.monotonic()
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - t0, _rss_mib(pid)))
                await asyncio.sleep(5)

        refs = await _references(client)
        await asyncio.gather(sampler(), *(worker() for _ in range(8)))
    late = [(t, r) for t, r in samples if t >= 60] or samples
    return {"seconds": args.soak_seconds, "requests": sum(done.values()), "outcomes": dict(done),
            "rss_samples": len(samples), "rss_start_mib": round(samples[0][1], 1),
            "rss_end_mib": round(samples[-1][1], 1), "rss_min_max_mib": [round(min(r for _, r in samples), 1),
                                                                       round(max(r for _, r in samples), 1)],
            "rss_slope_mib_per_min": round(_slope(late) * 60, 3), **_wait_idle()}


def _slope(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="load,fuzz,stall,soak")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--drop", type=float, default=0.2)
    parser.add_argument("--fuzz-seconds", type=int, default=240)
    parser.add_argument("--fuzz-paths", default=None, help="fuzz only the paths this regex matches (e.g. "
                                                            "'^/v1/(responses|messages)')")
    parser.add_argument("--soak-seconds", type=int, default=300)
    parser.add_argument("--stall-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "reliability.json",
                        help="the report; schemathesis' output goes beside it, as NAME-schemathesis.txt")
    args = parser.parse_args()
    parts = args.parts.split(",")
    log = Path(tempfile.gettempdir()) / "kvserve-reliability.log"
    proc = start([str(ROOT / ".venv/bin/kvserve"), "serve", "--port", str(PORT), "--max-model-len", "512"], log)
    cores = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    report = {"machine": f"{cores} cores",
              "model": "bundled SmolLM2-135M-Instruct, float32", "server": "kvserve serve --max-model-len 512"}
    try:
        if "load" in parts:
            report["load"] = asyncio.run(load(args))
            print("load:", json.dumps(report["load"]), flush=True)
        if "fuzz" in parts:
            report["fuzz"] = fuzz(args)
            print("fuzz:", json.dumps(report["fuzz"]), flush=True)
        if "stall" in parts:
            report["stall"] = stall(args)
            print("stall:", json.dumps(report["stall"]), flush=True)
        if "soak" in parts:
            report["soak"] = asyncio.run(soak(args, proc.pid))
            print("soak:", json.dumps(report["soak"]), flush=True)
        report["server_alive"] = httpx.get(f"{BASE}/health", timeout=30).status_code == 200
    finally:
        stop(proc)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
