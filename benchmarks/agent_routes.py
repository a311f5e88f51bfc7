"""What the Responses and Messages front ends cost next to chat completions: one kvserve server
(the bundled model with its tool-use template), the same workload through /v1/chat/completions,
/v1/responses and /v1/messages, rotating which goes first, in one run.

    python benchmarks/agent_routes.py [--levels 1,16] [--repeats 3] [--json out.json]

structured_throughput.py's workload (random 64-token prompts, here each a user message, 128 output
tokens at most, greedy, streamed; at concurrency C max(C, 4) requests with at most C in flight)
with two sides, each asked the same way on every route:
- schema: a JSON schema on every answer (chat `response_format`, Responses `text.format`, Messages
  `output_config.format`); it asks for one string of at least 2,000 characters, so every answer
  runs to 128 tokens;
- tools: two functions and tool_choice "auto" (the grammar that holds any call the model starts).
Greedy answers are the same tokens on every route (test_agent_apis.py checks it), so each side
generates the same tokens through the three routes, whatever the answers' lengths.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from compare import PORT, ROOT, start, stop
from serve import Workload, benchmark, load_tokenizer, make_prompts, served_model

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}
FUNCTIONS = [("get_weather", "The weather in a city", {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}),
             ("get_time", "The time in a time zone", {"type": "object", "properties": {"zone": {"type": "string"}},
                                                      "required": ["zone"]})]
ROUTES = ("chat", "responses", "messages")
SIDES = {
    "schema": {"chat": {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}},
               "responses": {"text": {"format": {"type": "json_schema", "name": "story", "schema": SCHEMA}}},
               "messages": {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}},
    "tools": {"chat": {"tools": [{"type": "function", "function": {"name": n, "description": d, "parameters": p}}
                                 for n, d, p in FUNCTIONS], "tool_choice": "auto"},
              "responses": {"tools": [{"type": "function", "name": n, "description": d, "parameters": p}
                                      for n, d, p in FUNCTIONS], "tool_choice": "auto"},
              "messages": {"tools": [{"name": n, "description": d, "input_schema": p} for n, d, p in FUNCTIONS],
                           "tool_choice": {"type": "auto"}}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    tokenizer = load_tokenizer(None)
    template = ROOT / "server/chat_templates/smollm2_tool_use.jinja"
    proc = start([str(ROOT / ".venv/bin/kvserve"), "serve", "--port", str(PORT), "--chat-template", str(template)],
                 Path("/tmp/kvserve-agent-routes.log"))
    runs: dict = {side: {route: {} for route in ROUTES} for side in SIDES}
    try:
        base = f"http://127.0.0.1:{PORT}"
        model = served_model(base)
        for r in range(args.repeats):
            prompts = make_prompts(tokenizer, "random", max(levels) + 1, 64, 0, seed=100 + r)
            for c in levels:
                for side, bodies in SIDES.items():
                    tokens = set()
                    for route in ROUTES[r % 3:] + ROUTES[:r % 3]:  # each route goes first once
                        w = Workload(base, model, prompts[1:max(c, 4) + 1], 128, max_concurrency=c, ignore_eos=False,
                                     warmup_prompt=prompts[0], extra_body=bodies[route], route=route)
                        s = benchmark(w, warmup=1)
                        assert s["failed"] == 0, s
                        tokens.add(s["output_tokens"])
                        runs[side][route].setdefault(c, []).append(s["output_tok_per_s"])
                        print(f"repeat {r} c={c} {side} {route}: {s['output_tok_per_s']} tok/s, "
                              f"{s['output_tokens']} tokens", flush=True)
                    assert len(tokens) == 1, f"the routes generated different token counts: {tokens}"
    finally:
        stop(proc)
    print("| side | C | chat tok/s | responses tok/s | responses / chat | messages tok/s | messages / chat |")
    print("|---|---|---|---|---|---|---|")
    for side in SIDES:
        for c in levels:
            chat, responses, messages = (statistics.median(runs[side][route][c]) for route in ROUTES)
            print(f"| {side} | {c} | {chat:.1f} | {responses:.1f} | {responses / chat:.3f} | {messages:.1f} | "
                  f"{messages / chat:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
