"""What structured outputs cost a serving step: one kvserve server, the same workload with and
without a JSON schema on every request, alternating, in one run; and with the grammar a chat
request with tools and tool_choice "auto" gets (free text, and any call held to its function).

    python benchmarks/structured_throughput.py [--levels 1,16,32] [--repeats 3] [--json out.json]

compare.py's workload (random 64-token prompts, 128 output tokens, temperature 0, streamed from
/v1/completions, at concurrency C max(C, 4) requests with at most C in flight). The schema asks
for one long string (at least 2,000 characters), so no constrained answer is complete within 128
tokens: both sides generate exactly 128 tokens a request, and the difference is the grammar's
mask and matcher at every step. The tools side sends that grammar (hermes format, two functions)
through vLLM's `structured_outputs.structural_tag`, on the same /v1/completions workload: the text
stays free, so this is the cost of the mask alone. Its EOS gets a -100 bias: the grammar takes
EOS in free text as the end of the output, which `ignore_eos` does not override.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from compare import PORT, ROOT, start, stop
from serve import Workload, benchmark, load_tokenizer, make_prompts, served_model

from server.tool_calls import FORMATS

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}
FUNCTIONS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}},
             {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                                  "required": ["zone"]}}]
SIDES = {
    "free": None,
    "schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}},
    "tools_auto": {"structured_outputs": {"structural_tag": FORMATS["hermes"].grammar(FUNCTIONS, "auto", True)},
                   "logit_bias": {"2": -100}},  # the bundled model's EOS
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,16,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tokenizer = load_tokenizer(None)
    log = Path("/tmp/kvserve-structured.log")
    proc = start([str(ROOT / ".venv/bin/kvserve"), "serve", "--port", str(PORT)], log)
    runs: dict[str, dict[int, list[float]]] = {side: {} for side in SIDES}
    try:
        base = f"http://127.0.0.1:{PORT}"
        model = served_model(base)
        for r in range(args.repeats):
            prompts = make_prompts(tokenizer, "random", max(levels) + 1, 64, 0, seed=100 + r)
            for c in levels:
                order = list(SIDES)[r % len(SIDES):] + list(SIDES)[:r % len(SIDES)]  # each side goes first once
                for side in order:
                    w = Workload(base, model, prompts[1:max(c, 4) + 1], 128, max_concurrency=c, ignore_eos=True,
                                 warmup_prompt=prompts[0], extra_body=SIDES[side])
                    s = benchmark(w, warmup=1)
                    assert s["failed"] == 0, s
                    # both sides generate the same tokens a request, or the comparison is void
                    assert s["output_tokens"] == 128 * len(w.prompts), s["output_tokens"]
                    runs[side].setdefault(c, []).append(s["output_tok_per_s"])
                    print(f"repeat {r} c={c} {side}: {s['output_tok_per_s']} tok/s", flush=True)
    finally:
        stop(proc)
    print("| C | free tok/s | schema tok/s | schema / free | tools auto tok/s | tools auto / free |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        free, schema, tools = (statistics.median(runs[side][c]) for side in SIDES)
        print(f"| {c} | {free:.1f} | {schema:.1f} | {schema / free:.3f} | {tools:.1f} | {tools / free:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
