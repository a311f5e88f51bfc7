"""What reading tool calls costs a stream: µs per token for each parser, fed one token at a time
(as the server feeds it), on a 2,000-token answer of prose and on one call whose arguments are
that long. Runs on the event loop, once per streamed token of each choice.

    python benchmarks/tool_parsers.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

from serve import load_tokenizer

from server.tool_calls import FORMATS, ToolCallStream

PROSE = "The keeper climbed the spiral stairs and lit the lamp that warned ships off the rocks. " * 130
ARGS = '{"text": "' + PROSE + '"}'
OUTPUTS = {
    "hermes": {"prose": PROSE, "long call": f'<tool_call>\n{{"name": "write", "arguments": {ARGS}}}\n</tool_call>'},
    "llama3_json": {"prose": PROSE, "long call": f'{{"name": "write", "parameters": {ARGS}}}'},
    "mistral": {"prose": PROSE, "long call": f'[TOOL_CALLS][{{"name": "write", "arguments": {ARGS}}}]'},
}


def per_token_us(fmt: str, pieces: list[str]) -> float:
    stream = ToolCallStream(FORMATS[fmt])
    start = time.perf_counter()
    for i, piece in enumerate(pieces):
        stream.feed(piece, final=i == len(pieces) - 1)
    return (time.perf_counter() - start) / len(pieces) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    print("| parser | output | tokens | µs per token (median) |")
    print("|---|---|---|---|")
    for fmt, outputs in OUTPUTS.items():
        for kind, text in outputs.items():
            ids = tokenizer.encode(text, add_special_tokens=False)
            pieces = [tokenizer.decode(ids[i:i + 1]) for i in range(len(ids))]
            times = [per_token_us(fmt, pieces) for _ in range(args.repeats)]
            print(f"| {fmt} | {kind} | {len(ids)} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
