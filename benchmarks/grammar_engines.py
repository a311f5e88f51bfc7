"""xgrammar against llguidance on the bundled tokenizer: compile time, mask time, correctness.

    python benchmarks/grammar_engines.py [--repeats 5] [--json out.json]

For each JSON schema below (and "any JSON object"), each engine compiles the schema (cold:
a new compiler, caching off), then drives a matcher over a valid instance token by token: at
every step it fills the next-token bitmask (and the test checks the instance's own token is
allowed), then accepts the token; at the end the matcher must accept the end of the output. An
invalid instance must be refused at some token. Mask time is per generated token: for one
sequence, and for 32 sequences at once through each engine's batched fill (threads). Medians of
--repeats, on whatever CPU this runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMAS = {
    "nested objects": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
        {"user": {"name": "Ada Lovelace", "age": 36}, "active": True}, {"user": {"name": "Ada"}, "active": True}),
    "enum": ({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False}, {"color": "green"}, {"color": "purple"}),
    "anyOf": ({"type": "object", "properties": {"v": {"anyOf": [{"type": "integer"},
                                                                {"type": "string", "maxLength": 5}]}},
               "required": ["v"], "additionalProperties": False}, {"v": "short"}, {"v": "much too long"}),
    "string pattern": ({"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
                        "required": ["id"], "additionalProperties": False}, {"id": "ABC-1234"}, {"id": "ABC-12X4"}),
    "array minItems": ({"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number"},
                                                               "minItems": 2, "maxItems": 4}},
                        "required": ["xs"], "additionalProperties": False}, {"xs": [1.5, 2, 3]}, {"xs": [1]}),
    "any JSON object": ({"type": "object"}, {"a": [1, {"b": None}], "c": "d"}, ["not", "an", "object"]),
}
BATCH = 32


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr, self.vocab = xgr, vocab
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.batch = xgr.BatchGrammarMatcher(max_threads=2)

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)

    @staticmethod
    def can_end(matcher) -> bool:
        return matcher.is_terminated() or matcher.accept_token(matcher_stop(matcher))


def matcher_stop(matcher) -> int:
    return matcher.stop_token_ids[0]


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.lg, self.lgt, self.vocab = llguidance, llguidance.torch, vocab
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, schema: dict):
        grammar = self.lg.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                             defaults={"whitespace_flexible": False})
        matcher = self.lg.LLMatcher(self.tok, grammar)  # llguidance compiles lazily, per matcher
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.lg.LLMatcher(self.tok, grammar)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.lgt.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matchers, bitmask) -> None:
        if len(matchers) == 1:
            self.lgt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            self.lgt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token) and not matcher.is_error()

    @staticmethod
    def can_end(matcher) -> bool:
        return matcher.is_accepting()


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def drive(engine, grammar, tokens: list[int], rows: int) -> tuple[bool, float]:
    """rows matchers over the same tokens: (every token allowed and accepted, and the end allowed;
    seconds of mask filling per token)."""
    matchers = [engine.matcher(grammar) for _ in range(rows)]
    bitmask = engine.bitmask(rows)
    ok, spent = True, 0.0
    for token in tokens:
        t = time.perf_counter()
        engine.fill(matchers, bitmask)
        spent += time.perf_counter() - t
        ok &= all(allowed(bitmask, r, token) for r in range(rows))
        ok &= all(engine.accept(m, token) for m in matchers)
        if not ok:
            return False, spent / max(1, len(tokens))
    return ok and all(engine.can_end(m) for m in matchers), spent / len(tokens)


def refuses(engine, grammar, tokens: list[int]) -> bool:
    matcher = engine.matcher(grammar)
    bitmask = engine.bitmask(1)
    for token in tokens:
        engine.fill([matcher], bitmask)
        if not allowed(bitmask, 0, token) or not engine.accept(matcher, token):
            return True
    return not engine.can_end(matcher)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from engine import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    vocab = len(tokenizer)
    results = {}
    for engine in (XGrammar(tokenizer, vocab), LLGuidance(tokenizer, vocab)):
        for name, (schema, good, bad) in SCHEMAS.items():
            good_ids = tokenizer.encode(json.dumps(good, separators=(",", ":")), add_special_tokens=False)
            bad_ids = tokenizer.encode(json.dumps(bad, separators=(",", ":")), add_special_tokens=False)
            compile_s, one, many, correct = [], [], [], True
            for _ in range(args.repeats):
                t = time.perf_counter()
                grammar = engine.compile(schema)
                compile_s.append(time.perf_counter() - t)
                ok1, t1 = drive(engine, grammar, good_ids, 1)
                ok32, t32 = drive(engine, grammar, good_ids, BATCH)
                correct &= ok1 and ok32 and refuses(engine, grammar, bad_ids)
                one.append(t1)
                many.append(t32)
            row = {"compile_ms": round(statistics.median(compile_s) * 1e3, 2),
                   "mask_us_per_token_batch1": round(statistics.median(one) * 1e6, 1),
                   f"mask_us_per_step_batch{BATCH}": round(statistics.median(many) * 1e6, 1),
                   "correct": correct, "tokens": len(good_ids)}
            results.setdefault(engine.name, {})[name] = row
            print(f"{engine.name:10s} {name:16s} {row}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"vocab": vocab, "batch": BATCH, "results": results}, indent=1))


if __name__ == "__main__":
    main()
