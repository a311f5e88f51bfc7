"""Per-request sampling and stopping options, as vLLM's SamplingParams."""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


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
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        need(isinstance(self.n, int) and self.n >= 1, "n", "must be at least 1")
        need(self.temperature >= 0.0, "temperature", "must be non-negative")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1, 0 (off) or positive")
        need(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1")
        need(self.min_tokens >= 0, "min_tokens", "must be non-negative")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "must not exceed max_tokens")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        need(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or 0 <= value <= MAX_LOGPROBS, name, f"must be in [0, {MAX_LOGPROBS}]")
        need(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
             "must be non-empty strings")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative token ids")
        if self.logit_bias:
            need(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias",
                 "values must be in [-100, 100]")
