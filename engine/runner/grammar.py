"""Structured outputs: StructuredOutputs compiled by xgrammar into grammars over the model's
vocabulary, and one matcher per sequence that says which tokens may come next.

xgrammar against llguidance on the bundled tokenizer: benchmarks/grammar_engines.py, BENCHMARKS.md.
"""
from __future__ import annotations

import json
import re
import threading

import torch
import xgrammar as xgr

from engine.core.sampling_params import StructuredOutputs

# xgrammar's compiler caches what it compiled (so each distinct schema compiles once); this bounds
# the memory the cache may hold, whatever schemas clients send
_CACHE_BYTES = 256 << 20


class Grammars:
    """Compiles StructuredOutputs (thread-safe, cached by xgrammar) and makes matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer, self._tokenizer_lock = tokenizer, threading.Lock()  # (called from several threads)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=_CACHE_BYTES)

    def compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        """ValueError, naming spec.field, for a schema, regex or grammar xgrammar cannot compile."""
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError) as e:  # xgrammar's errors for bad input
            why = re.sub(r"^\[[\d:]+\] \S+?:\d+: ", "", str(e)).strip()  # without its C++ source line
            raise ValueError(f"{spec.field}: cannot be compiled into a grammar: {why}") from None

    def _compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        c = self._compiler
        if spec.kind == "json":
            json.loads(spec.json)  # a JSONDecodeError is a ValueError
            # compact JSON: free whitespace lets a small model pad its answer for ever
            return c.compile_json_schema(spec.json, any_whitespace=False, separators=(",", ":"))
        if spec.kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"))
        if spec.kind == "regex":
            return c.compile_regex(spec.regex)
        if spec.kind == "choice":  # one alternative per string, as GBNF string literals
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
        if spec.kind == "structural_tag":
            return c.compile_structural_tag(spec.structural_tag)
        return c.compile_grammar(spec.grammar)

    def matcher(self, spec: StructuredOutputs) -> xgr.GrammarMatcher | DeferredMatcher:
        matcher = xgr.GrammarMatcher(self.compile(spec))
        if spec.start_after is None:
            return matcher
        with self._tokenizer_lock:
            marker = self._tokenizer.encode(spec.start_after, add_special_tokens=False)
        return DeferredMatcher(matcher, tuple(marker))


class DeferredMatcher:
    """A matcher that holds only after the output has shown `marker` (token ids): until then
    every token may come next and nothing ends the language."""

    def __init__(self, matcher: xgr.GrammarMatcher, marker: tuple[int, ...]) -> None:
        self.matcher, self.marker = matcher, marker
        self.recent: list[int] = []  # the last tokens while the marker has not appeared
        self.started = False

    def accept_token(self, token: int) -> bool:
        if self.started:
            return self.matcher.accept_token(token)
        self.recent = (self.recent + [token])[-len(self.marker):]
        self.started = tuple(self.recent) == self.marker
        return True

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.started:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        # (else the row keeps the all-allowed bits it was allocated with)

    def is_terminated(self) -> bool:
        return self.started and self.matcher.is_terminated()


def fill_bitmask(matchers: list[xgr.GrammarMatcher], rows: list[int], num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(V / 32)] int32: bit t of row r says whether token t may come next in that
    row's matcher (the rows given; the others allow every token). One matcher at a time: xgrammar's
    threaded batch fill cost far more than it saved beside the engine's own threads (BENCHMARKS.md,
    "What a schema on every request costs serving")."""
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
    for matcher, row in zip(matchers, rows):
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [B, V] in place: -inf where the bitmask's bit is 0."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1])
