"""One sequence being generated: pure state, no torch.

A request with n > 1 becomes n sequences that share a request_id and differ in `index`.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from engine.core.outputs import TokenLogprobs
from engine.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.core.beam import BeamGroup


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class GrammarMatcher(Protocol):
    """Structured outputs: what the engine asks of a sequence's matcher (engine/runner/grammar.py)."""

    def accept_token(self, token_id: int) -> bool: ...

    def is_terminated(self) -> bool: ...


class ProposerState:
    """A speculative proposer's own record of one sequence (engine/runner/spec_decode.py, lookahead.py)."""


@dataclass
class ContrastiveCandidates:
    """Contrastive search (engine/runner/contrastive.py): the k most probable tokens after a
    sequence's last token, their probabilities and, when the request asks for logprobs, each
    one's logprobs entry."""

    token_ids: list[int]
    probs: list[float]
    entries: list[TokenLogprobs] | None = None


@dataclass
class DraftTree:
    """Drafts that are not one chain (lookahead decoding). Draft i sits offsets[i] positions after
    the last token and sees the history, the last token, itself and the drafts in sees[i] (earlier
    ones). parents[i]: the draft it follows in a candidate continuation (-1: the last token), or
    None for a guess that is not checked, only run (its pick is returned to the proposer)."""

    offsets: list[int]
    sees: list[tuple[int, ...]]
    parents: list[int | None]

    @property
    def num_candidates(self) -> int:
        return sum(p is not None for p in self.parents)


@dataclass(eq=False)
class Request:
    request_id: str
    index: int  # choice index within the request (n > 1)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never None here
    min_tokens_banned: tuple[int, ...] = ()  # EOS and stop ids, masked until min_tokens are out
    # bad_words as token sequences: the last token of each is masked where the output ends in the rest
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    cache_salt: str | None = None  # set: its prefix-cache keys are found only by the same salt
    grammar: GrammarMatcher | None = None  # structured outputs: the sequence's matcher
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # the priority scheduling policy's: lower first
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    num_preemptions: int = 0
    # longrope models (Phi-3): whether its cached KV was computed under the long factors
    long_rope_kv: bool = False
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission
    first_scheduled_time: float | None = None  # time.monotonic() stamps, for metrics
    last_token_time: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # speculative decoding: tokens proposed to follow token_ids, checked by this step's forward pass
    draft_token_ids: list[int] = field(default_factory=list)
    draft_tree: DraftTree | None = None  # None: the drafts are one chain, each following the one before
    spec_state: ProposerState | None = None  # the proposer's own record of the sequence
    beam: BeamGroup | None = None  # beam search: the group whose slot `index` this sequence is
    contrastive_next: ContrastiveCandidates | None = None  # contrastive search: those after token_ids[-1]

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)  # prompt then outputs
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.seq_id = f"{self.request_id}#{self.index}"  # read many times a step: not a property

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def clear_drafts(self) -> None:
        self.draft_token_ids = []
        self.draft_tree = None

    @property
    def num_draft_candidates(self) -> int:
        """Draft tokens that are checked (a tree's guesses are not)."""
        return self.draft_tree.num_candidates if self.draft_tree is not None else len(self.draft_token_ids)
