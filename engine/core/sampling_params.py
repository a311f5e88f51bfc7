"""Per-request sampling and stopping options, as vLLM's SamplingParams."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

Need = Callable[[bool, str, str], None]  # validate's check: (ok, field, why it is not)

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's range; higher is all but uniform sampling
# A few stop rules are what clients use; each is checked at every step, so they are bounded.
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_BAD_WORDS = 64  # each is matched against the output's tail at every step
MAX_ALLOWED_TOKEN_IDS = 1 << 18
SEED_RANGE = (-(1 << 63), 1 << 64)  # signed or unsigned 64-bit; both map onto torch's unsigned seed
# What each engine output carries (vLLM's RequestOutputKind): "cumulative" the whole answer so far,
# "delta" only what is new since the last output, "final" one output, when the request ends.
OUTPUT_KINDS = ("cumulative", "delta", "final")
MAX_GRAMMAR_CHARS = 64 << 10  # a schema, regex or grammar: compiling is bounded by its size
MAX_CHOICES = 256
# Beam search: each step sorts about 2 * width**2 candidates in Python, so the width is bounded.
MAX_BEAM_WIDTH = 32
MAX_LENGTH_PENALTY = 10.0
# Contrastive search runs top_k candidate rows per sequence and step, under a dense mask.
MAX_CONTRASTIVE_TOP_K = 32
EARLY_STOPPING = (True, False, "never")
_KINDS = ("json", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputs:
    """An output constrained to a language (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema, any JSON object, a regular expression, a choice of strings, an EBNF grammar
    (xgrammar's dialect of GBNF), or an xgrammar structural tag (text and tagged JSON-schema
    segments: how tool calls are held to their functions' schemas). Tokens that would leave the
    language are masked at every step; the request ends when the output is complete. `field` names
    the API field that asked for it, for error messages."""

    json: str | dict[str, Any] | None = None  # a JSON schema (a dict is kept as JSON text)
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | dict[str, Any] | None = None  # a dict is kept as JSON text
    field: str = "structured_outputs"
    # the language holds from the token after this text's tokens first appear in the output (a
    # reasoning model's "</think>": the thinking before it is free); None: from the first token
    start_after: str | None = None

    def __post_init__(self) -> None:
        for name in ("json", "structural_tag"):
            if isinstance(getattr(self, name), dict):  # key order kept: it is the output's
                object.__setattr__(self, name, json.dumps(getattr(self, name)))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        self.validate()

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in _KINDS if getattr(self, k) is not None)

    def validate(self) -> None:
        set_ = [k for k in _KINDS if getattr(self, k) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            raise ValueError(f"{self.field}: give exactly one of json, json_object, regex, choice, grammar, "
                             f"structural_tag (got {', '.join(set_) or 'none'})")
        text = self.json or self.regex or self.grammar or self.structural_tag
        if text is not None and not (isinstance(text, str) and 0 < len(text) <= MAX_GRAMMAR_CHARS):
            raise ValueError(f"{self.field}: must be a non-empty string of at most {MAX_GRAMMAR_CHARS} characters")
        if self.choice is not None and not (0 < len(self.choice) <= MAX_CHOICES and all(
                isinstance(c, str) and 0 < len(c) <= MAX_STOP_STRING_CHARS for c in self.choice)):
            raise ValueError(f"{self.field}: choice must be 1 to {MAX_CHOICES} non-empty strings of at most "
                             f"{MAX_STOP_STRING_CHARS} characters")
        if self.start_after is not None and not (isinstance(self.start_after, str)
                                                 and 0 < len(self.start_after) <= MAX_STOP_STRING_CHARS):
            raise ValueError(f"{self.field}: start_after must be a non-empty string of at most "
                             f"{MAX_STOP_STRING_CHARS} characters")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives besides the chosen token
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # with skip_special_tokens off: True puts a space between a special token and the text around it,
    # False none; None leaves the text as the tokenizer decodes it
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool = False  # the stop string that ended the output is kept in its text
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: max_model_len)
    allowed_token_ids: list[int] | None = None  # every output token is one of these
    bad_words: list[str] | None = None  # never in the output (as vLLM: the words' tokens, also after a space)
    output_kind: str = "cumulative"  # one of OUTPUT_KINDS
    structured_outputs: StructuredOutputs | None = None
    # beam search (transformers' semantics): best_of beams (default n), the n best returned
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # contrastive search (transformers' semantics) when > 0: top_k candidates, scored
    # (1 - penalty_alpha) * probability - penalty_alpha * degeneration penalty
    penalty_alpha: float = 0.0
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self.validate()

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range (bounds that need the model's
        vocabulary are checked by the engine, which knows it)."""
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {why} (got {_short(getattr(self, name))})")

        def integer(name: str, low: int, high: int | None = None, optional: bool = False) -> bool:
            value = getattr(self, name)
            if value is None and optional:
                return True
            return _is_int(value) and low <= value and (high is None or value <= high)

        need(integer("n", 1), "n", "must be at least 1")
        need(_in(self.temperature, 0.0, MAX_TEMPERATURE), "temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        need(_in(self.top_p, 0.0, 1.0) and self.top_p > 0.0, "top_p", "must be in (0, 1]")
        need(integer("top_k", 0), "top_k", "must be -1, 0 (off) or positive")
        need(_in(self.min_p, 0.0, 1.0), "min_p", "must be in [0, 1]")
        need(self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]), "seed",
             "must be a 64-bit integer")
        need(integer("max_tokens", 1, optional=True), "max_tokens", "must be at least 1")
        need(integer("min_tokens", 0), "min_tokens", "must be non-negative")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "must not exceed max_tokens")
        need(_in(self.presence_penalty, -2.0, 2.0), "presence_penalty", "must be in [-2, 2]")
        need(_in(self.frequency_penalty, -2.0, 2.0), "frequency_penalty", "must be in [-2, 2]")
        need(_in(self.repetition_penalty, 0.0, 2.0) and self.repetition_penalty > 0.0, "repetition_penalty",
             "must be in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            need(integer(name, 0, MAX_LOGPROBS, optional=True), name, f"must be in [0, {MAX_LOGPROBS}]")
        need(self.output_kind in OUTPUT_KINDS, "output_kind", f"must be one of {OUTPUT_KINDS}")
        need(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
             "structured_outputs", "must be a StructuredOutputs")
        # the ban would hold back the end of output a complete grammar allows alone
        need(self.structured_outputs is None or self.min_tokens == 0, "min_tokens",
             "cannot be combined with structured outputs")
        self._validate_beam_search(need)
        self._validate_contrastive(need)
        need(len(self.stop_strings) <= MAX_STOP_STRINGS, "stop", f"must hold at most {MAX_STOP_STRINGS} strings")
        need(all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop_strings), "stop",
             f"must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
        stop_ids = self.stop_token_ids or []  # (a list since __post_init__)
        need(len(stop_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"must hold at most {MAX_STOP_TOKEN_IDS} token ids")
        need(all(_is_int(t) and t >= 0 for t in stop_ids), "stop_token_ids",
             "must be non-negative token ids")
        self._validate_vocabulary_rules(need, integer)
        if self.logit_bias:
            need(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
                 f"must hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
            need(all(_in(b, -100.0, 100.0) for b in self.logit_bias.values()), "logit_bias",
                 "values must be in [-100, 100]")

    def _validate_vocabulary_rules(self, need: Need, integer: Callable[..., bool]) -> None:
        need(self.spaces_between_special_tokens in (None, True, False), "spaces_between_special_tokens",
             "must be a boolean")
        need(isinstance(self.include_stop_str_in_output, bool), "include_stop_str_in_output", "must be a boolean")
        need(self.truncate_prompt_tokens in (None, -1) or integer("truncate_prompt_tokens", 1),
             "truncate_prompt_tokens", "must be -1 (the context length) or positive")
        allowed = self.allowed_token_ids
        need(allowed is None or 0 < len(allowed) <= MAX_ALLOWED_TOKEN_IDS, "allowed_token_ids",
             f"must hold 1 to {MAX_ALLOWED_TOKEN_IDS} token ids")
        need(allowed is None or all(_is_int(t) and t >= 0 for t in allowed), "allowed_token_ids",
             "must be non-negative token ids")
        words = self.bad_words
        need(words is None or len(words) <= MAX_BAD_WORDS, "bad_words", f"must hold at most {MAX_BAD_WORDS} words")
        need(words is None or all(isinstance(w, str) and len(w.strip()) > 0 and len(w) <= MAX_STOP_STRING_CHARS
                                  for w in words), "bad_words",
             f"must be non-blank strings of at most {MAX_STOP_STRING_CHARS} characters")

    def _validate_beam_search(self, need: Need) -> None:
        need(isinstance(self.use_beam_search, bool), "use_beam_search", "must be a boolean")
        beam = self.use_beam_search
        if not beam:
            need(self.best_of is None or self.best_of == self.n, "best_of",
                 "other than n, only with use_beam_search (sampling best_of is not supported)")
            need(self.length_penalty == 1.0, "length_penalty", "only with use_beam_search")
            need(self.early_stopping is False, "early_stopping", "only with use_beam_search")
            return
        need(self.best_of is None or (_is_int(self.best_of) and self.n <= self.best_of <= MAX_BEAM_WIDTH),
             "best_of", f"must be an integer from n to {MAX_BEAM_WIDTH} (the beam width)")
        need(self.n <= MAX_BEAM_WIDTH, "n", f"must be at most {MAX_BEAM_WIDTH} with use_beam_search")
        need(_in(self.length_penalty, -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY), "length_penalty",
             f"must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}]")
        need(any(self.early_stopping is v or (self.early_stopping == v and isinstance(v, str))
                 for v in EARLY_STOPPING), "early_stopping", 'must be true, false or "never"')
        need(self.temperature == 0.0, "temperature", "must be 0 with use_beam_search")
        # what would change the scores the beams are chosen by: not part of this beam search
        for name, off in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0), ("repetition_penalty", 1.0), ("logit_bias", None),
                          ("structured_outputs", None), ("allowed_token_ids", None), ("bad_words", None)):
            need(getattr(self, name) in (off, {}), name, "is not supported with use_beam_search")

    def _validate_contrastive(self, need: Need) -> None:
        need(_in(self.penalty_alpha, 0.0, 1.0), "penalty_alpha", "must be in [0, 1] (0: off)")
        if not self.penalty_alpha:
            return
        need(2 <= self.top_k <= MAX_CONTRASTIVE_TOP_K, "top_k",
             f"must be from 2 to {MAX_CONTRASTIVE_TOP_K} with penalty_alpha (the candidates of contrastive search)")
        need(self.temperature == 0.0, "temperature", "must be 0 with penalty_alpha (contrastive search is greedy)")
        need(not self.use_beam_search, "use_beam_search", "cannot be combined with penalty_alpha")
        for name, off in (("top_p", 1.0), ("min_p", 0.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                          ("repetition_penalty", 1.0), ("logit_bias", None), ("structured_outputs", None),
                          ("allowed_token_ids", None), ("bad_words", None)):
            need(getattr(self, name) in (off, {}), name, "is not supported with penalty_alpha")

    @property
    def contrastive(self) -> bool:
        return self.penalty_alpha > 0.0

    @property
    def beam_width(self) -> int:
        """Sequences the request runs at once: its beams, or its n choices."""
        return (self.best_of or self.n) if self.use_beam_search else self.n

    @property
    def generator_seed(self) -> int | None:
        """The seed as torch takes it (unsigned 64-bit): -1 and 2**64 - 1 name the same stream."""
        return None if self.seed is None else self.seed & ((1 << 64) - 1)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _in(value: object, low: float, high: float) -> bool:
    """A finite real number in [low, high] (NaN and the infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high


def _short(value: object) -> str:
    """The offending value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
