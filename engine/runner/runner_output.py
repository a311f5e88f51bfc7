"""What one step of the runner hands back to the engine, keyed by sequence."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.core.beam import Candidates
from engine.core.outputs import TokenLogprobs
from engine.core.request import ContrastiveCandidates


@dataclass
class ModelRunnerOutput:
    # seq_id -> the next token; under speculative decoding the accepted drafts, then the target's
    # own next token (1 to k + 1 tokens)
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token
    # seq_id -> tokens of the step not kept, where it had drafts (their slots are rolled back)
    num_rejected: dict[str, int] = field(default_factory=dict)
    # seq_id -> the target's pick at the last token and at each draft of its tree (lookahead's guesses)
    tree_picks: dict[str, list[int]] = field(default_factory=dict)
    # seq_id -> (index of the first prompt token scored, logprobs of the prompt tokens this step
    # scored, in order); after a preemption the recomputed ones come again
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # seq_id -> a beam slot's best continuations (beam search picks among a group's together)
    beam_candidates: dict[str, Candidates] = field(default_factory=dict)
    # seq_id -> a contrastive sequence's candidates for the token after its last (see contrastive.py)
    contrastive: dict[str, ContrastiveCandidates] = field(default_factory=dict)

    def merge(self, other: ModelRunnerOutput) -> None:
        """Add another part of the step's sequences (each seq_id is in one part only)."""
        for f in fields(self):
            getattr(self, f.name).update(getattr(other, f.name))
