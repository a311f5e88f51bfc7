"""Serving benchmark for any OpenAI-compatible server (modelled on `vllm bench serve`).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 [--dataset random|shared-prefix]
        [--input-len 64] [--output-len 128] [--prefix-len 512] [--num-prompts 64]
        [--request-rate inf] [--max-concurrency 16] [--json out.json]

Every request streams from /v1/completions at temperature 0 with `ignore_eos` (servers that
ignore it may stop early; the output tokens counted are the ones that came back); a Workload's
`route` sends the prompt as a user message to chat, Responses or Messages instead. Per request:
TTFT (send to first text), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (gaps between text
chunks) and E2E; reported as mean, p50 and p99, with request/s and output tok/s over the run.

Datasets: `random` = prompts of --input-len random vocabulary tokens (decoded to text);
`shared-prefix` = one random --prefix-len-token system prompt followed by a distinct
--input-len-token question per request (what prefix caching is for).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first text
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    error: str = ""


@dataclass
class Workload:
    base_url: str
    model: str
    prompts: list[str]
    output_len: int
    request_rate: float = float("inf")  # Poisson arrivals; inf = all at once
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True  # some servers reject the field (transformers serve)
    warmup_prompt: str | None = None  # default: the first prompt (then a prompt cache has seen it)
    extra_body: dict | None = None  # more request fields (e.g. response_format)
    route: str = "completions"  # or "chat", "responses", "messages": the prompt as a user message


# --- prompts -----------------------------------------------------------------------------
def _random_text(tokenizer, rng: random.Random, n: int) -> str:
    """About n tokens of random vocabulary, as text that re-encodes to n tokens or close."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(tokenizer.vocab_size) if i not in special]
    ids = [rng.choice(vocab) for _ in range(n)]
    return tokenizer.decode(tokenizer.encode(tokenizer.decode(ids))[:n])


def make_prompts(tokenizer, dataset: str, num: int, input_len: int, prefix_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if dataset == "random":
        return [_random_text(tokenizer, rng, input_len) for _ in range(num)]
    prefix = _random_text(tokenizer, rng, prefix_len)
    return [f"{prefix}\n{_random_text(tokenizer, rng, input_len)}" for _ in range(num)]


# --- one request -------------------------------------------------------------------------
def request_body(w: Workload, prompt: str) -> dict:
    """The streamed request for `prompt` on the workload's route, greedy, `output_len` tokens at most."""
    user = [{"role": "user", "content": prompt}]
    body = {"completions": {"prompt": prompt, "max_tokens": w.output_len},
            "chat": {"messages": user, "max_tokens": w.output_len},
            "responses": {"input": prompt, "max_output_tokens": w.output_len},
            "messages": {"messages": user, "max_tokens": w.output_len}}[w.route]
    body.update(model=w.model, temperature=0.0, stream=True)
    if w.route in ("completions", "chat"):
        body["stream_options"] = {"include_usage": True}
    if w.ignore_eos:
        body["ignore_eos"] = True
    return body | (w.extra_body or {})


def read_event(route: str, data: str) -> tuple[bool, dict, str, bool]:
    """One event's data: (it carries text, the usage it reports, an error, the stream is complete)."""
    if data == "[DONE]":
        return False, {}, "", True
    event = json.loads(data)
    kind = event.get("type", "")
    if event.get("error") or kind in ("error", "response.failed"):
        return False, {}, str(event.get("error") or event["response"]["error"])[:200], True
    if route == "responses":
        done = kind in ("response.completed", "response.incomplete")
        usage = event["response"]["usage"] if done else {}
        return kind.endswith(".delta"), {"prompt": usage.get("input_tokens"), "output": usage.get(
            "output_tokens")}, "", done
    if route == "messages":
        usage = event.get("usage") or event.get("message", {}).get("usage") or {}
        prompt = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0) if usage else None
        return kind == "content_block_delta", {"prompt": prompt, "output": usage.get("output_tokens")}, "", \
            kind == "message_stop"
    usage = event.get("usage") or {}
    text = any(c.get("text") or c.get("delta", {}).get("content") or c.get("delta", {}).get("tool_calls")
               for c in event.get("choices", []))
    return text, {"prompt": usage.get("prompt_tokens"), "output": usage.get("completion_tokens")}, "", False


async def send(client: httpx.AsyncClient, w: Workload, prompt: str) -> RequestResult:
    res = RequestResult(ok=False)
    start = last = time.perf_counter()
    chunks = 0
    try:
        path = "/v1/chat/completions" if w.route == "chat" else f"/v1/{w.route}"
        async with client.stream("POST", f"{w.base_url}{path}", json=request_body(w, prompt)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                text, usage, res.error, done = read_event(w.route, line[5:].strip())
                if res.error:
                    return res
                res.prompt_tokens = usage.get("prompt") or res.prompt_tokens
                res.output_tokens = usage.get("output") or res.output_tokens
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                if done:
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks  # a server without usage in streams
    res.ok = chunks > 0
    if not res.ok:
        res.error = "no text came back"
    return res


# --- a run ---------------------------------------------------------------------------------
async def run(w: Workload) -> tuple[list[RequestResult], float]:
    """Send every prompt (Poisson arrivals, capped concurrency); returns results and wall time."""
    rng = random.Random(w.seed)
    limit = asyncio.Semaphore(w.max_concurrency or len(w.prompts))
    timeout = httpx.Timeout(None, connect=30.0)
    pool = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=pool) as client:
        async def one(prompt: str) -> RequestResult:
            async with limit:
                return await send(client, w, prompt)

        start = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(w.prompts):
            if i and w.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(w.request_rate))
            tasks.append(asyncio.create_task(one(prompt)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def _stats(xs: list[float], scale: float = 1000.0) -> dict[str, float]:
    """mean / p50 / p99, in milliseconds by default."""
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    xs = sorted(xs)

    def pct(q: float) -> float:  # linear interpolation, as numpy's default
        k = (len(xs) - 1) * q
        lo = int(k)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"mean": round(statistics.fmean(xs) * scale, 2), "p50": round(pct(0.5) * scale, 2),
            "p99": round(pct(0.99) * scale, 2)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": round(duration, 3),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "request_per_s": round(len(ok) / duration, 3), "output_tok_per_s": round(out_tokens / duration, 2),
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl_ms": _stats([g for r in ok for g in r.itl]),
        "e2e_ms": _stats([r.e2e for r in ok]),
    }


def benchmark(w: Workload, warmup: int = 1) -> dict:
    """Warm the server up, run the workload, return the summary (also usable from other scripts)."""
    if warmup:
        prompt = w.warmup_prompt or w.prompts[0]
        short = Workload(w.base_url, w.model, [prompt] * warmup, min(w.output_len, 8), ignore_eos=w.ignore_eos)
        asyncio.run(run(short))
    results, duration = asyncio.run(run(w))
    summary = summarize(results, duration)
    summary["per_request"] = [asdict(r) | {"itl": None} for r in results]
    return summary


def served_model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path is None:
        from engine import bundled_model_dir

        path = str(bundled_model_dir())
    return AutoTokenizer.from_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    ap.add_argument("--tokenizer", default=None, help="for building prompts; default: the bundled model's")
    ap.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens of the common prefix")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson; inf = all at once")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="send ignore_eos (vLLM's extension) so every request makes --output-len tokens")
    ap.add_argument("--warmup", type=int, default=1, help="short requests sent before measuring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary and per-request results here")
    args = ap.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    prompts = make_prompts(tokenizer, "random", 1, args.input_len, 0, args.seed + 1)  # the warm-up's own
    prompts += make_prompts(tokenizer, args.dataset, args.num_prompts, args.input_len,
                            args.prefix_len, args.seed)
    w = Workload(args.base_url, args.model or served_model(args.base_url), prompts[1:], args.output_len,
                 args.request_rate, args.max_concurrency, args.seed, args.ignore_eos, warmup_prompt=prompts[0])
    summary = benchmark(w, args.warmup)
    summary["args"] = vars(args)
    for key in ("completed", "failed", "duration_s", "request_per_s", "output_tok_per_s"):
        print(f"{key:>18}: {summary[key]}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[key]
        print(f"{key:>18}: mean {s['mean']:.1f}  p50 {s['p50']:.1f}  p99 {s['p99']:.1f}")
    if summary["errors"]:
        print("errors:", *summary["errors"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
