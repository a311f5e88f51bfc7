"""Beam search's bookkeeping for one request (pure Python, no torch).

The rules are transformers' (`generate(num_beams=k, do_sample=False)`, v5), written anew: each
step, every running beam's log-probabilities are added to its score and the best
`keep = max(2, 1 + number of stop tokens) * k` continuations over all beams are taken. Those that
end (a stop token or stop string, or the length limit) and rank among the first k become finished hypotheses,
scored `sum of logprobs / generated_length ** length_penalty` (the length counts the stop token);
the best k finished are kept. The best k continuations that do not end are the next beams. The
search ends when all k finished places are taken and early_stopping is True, when no running beam
can beat the worst finished one (early_stopping False: judged at the current length; "never"
with a positive length penalty: at the longest length), or when every continuation ends. Scores
are float32, as transformers keeps them, so the two make the same choices.

Each beam lives in a slot: a Request of the group, whose token ids and KV blocks are the beam's.
A step's slots report their candidates (their own best continuations, which together hold the
step's best `keep`), and the group chooses once every running slot has reported.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.core.outputs import TokenLogprobs

NEG = np.float32(-1.0e9)  # transformers' "never": scores of beams that must not be chosen


@dataclass
class Hypothesis:
    """A finished beam: its output tokens (the stop token included), scores and logprobs."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty
    logprobs: list[TokenLogprobs]
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None  # the stop token or stop string that ended it


@dataclass
class Candidates:
    """One slot's best continuations at this step: token ids and their log-probabilities (float32,
    best first), and the logprobs entry of each when the request asks for logprobs."""

    token_ids: list[int]
    logprobs: list[float]
    entries: list[TokenLogprobs] | None = None


@dataclass
class Move:
    """After a step, slot `slot` holds beam `parent`'s history (a slot index) and then `token`."""

    slot: int
    parent: int
    token: int
    logprobs: TokenLogprobs | None


@dataclass
class BeamGroup:
    width: int  # k, the beam width (best_of)
    num_return: int  # n <= k
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    stop_token_ids: frozenset[int]  # tokens that end a hypothesis (EOS, unless ignored, and stop ids)
    forked: bool = False  # slots 1.. hold beams (before the first step, only slot 0 runs)
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most width
    done: bool = False
    _pending: dict[int, Candidates] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = max(2, 1 + len(self.stop_token_ids)) * self.width
        self.scores = [np.float32(0.0)] + [NEG] * (self.width - 1)  # each slot's beam: its sum of logprobs
        self.ranks = list(range(self.width))  # each slot's beam: its place among the beams (for ties)

    @property
    def running_slots(self) -> list[int]:
        return list(range(self.width)) if self.forked else [0]

    def report(self, slot: int, cands: Candidates) -> None:
        self._pending[slot] = cands

    def forget(self, slot: int) -> None:
        """A slot's candidates no longer stand (it was preempted; it reports again once recomputed)."""
        self._pending.pop(slot, None)

    @property
    def ready(self) -> bool:
        return all(s in self._pending for s in self.running_slots)

    def step(self, histories: list[list[int]], past: list[list[TokenLogprobs]],
             stop_string: Callable[[int, int], str | None] | None = None) -> list[Move]:
        """Choose the next beams from every slot's report. histories[s]: slot s's output tokens so
        far; past[s]: their logprobs entries (empty unless asked for); stop_string(slot, token): the
        stop string that token would complete after the slot's text, if any. Finished hypotheses are
        kept here; the moves say what each slot holds next (none once the search is done)."""
        cands = self._top_continuations()
        gen_len = len(histories[0]) + 1  # every beam has generated as many tokens
        stops = [tok if tok in self.stop_token_ids else stop_string(slot, tok) if stop_string else None
                 for _, tok, slot, _ in cands]
        ends = [stop is not None or gen_len >= self.max_new_tokens for stop in stops]
        for rank, ((score, tok, slot, entry), end) in enumerate(zip(cands, ends)):
            if end and rank < self.width:
                self._finish(histories[slot] + [tok], past[slot] + ([entry] if entry else []), score, gen_len,
                             stops[rank])
        running = sorted(range(len(cands)), key=lambda i: (-(cands[i][0] + (NEG if ends[i] else 0)), i))
        running = running[:self.width]
        self.scores = [np.float32(cands[i][0] + (NEG if ends[i] else np.float32(0))) for i in running]
        self._pending.clear()
        self.done = (all(ends) or (self.early_stopping is True and len(self.finished) == self.width)
                     or not self._can_improve(gen_len))
        if self.done:
            return []
        self.forked = True
        return self._moves([cands[i] for i in running])

    def _top_continuations(self) -> list[tuple[np.float32, int, int, TokenLogprobs | None]]:
        """The step's best `keep` (score, token, slot, logprobs entry), best first; ties go to the
        better-ranked beam, then the lower token id, as transformers' top-k over [beams x vocab] does."""
        out = []
        for slot in self.running_slots:
            c = self._pending[slot]
            base = self.scores[slot]
            for j, (tok, lp) in enumerate(zip(c.token_ids[:self.keep], c.logprobs[:self.keep])):
                out.append((np.float32(base + np.float32(lp)), tok, slot, c.entries[j] if c.entries else None))
        out.sort(key=lambda c: (-c[0], self.ranks[c[2]], c[1]))
        return out[:self.keep]

    def _finish(self, tokens: list[int], logprobs: list[TokenLogprobs], total: np.float32, gen_len: int,
                stop: int | str | None) -> None:
        score = float(total / np.float32(gen_len ** self.length_penalty))
        hyp = Hypothesis(tokens, float(total), score, logprobs, "length" if stop is None else "stop", stop)
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: -h.score)  # stable: the earlier of two equal scores stays first
        del self.finished[self.width:]

    def _can_improve(self, gen_len: int) -> bool:
        """Whether the best running beam (self.scores in rank order) could still beat the worst
        finished hypothesis (or a free place, -1e9)."""
        length = self.max_new_tokens if self.early_stopping == "never" and self.length_penalty > 0 else gen_len
        best = self.scores[0] / np.float32(length ** self.length_penalty)
        worst = np.float32(self.finished[-1].score) if len(self.finished) == self.width else NEG
        return bool(best > worst)

    def _moves(self, beams: list[tuple[np.float32, int, int, TokenLogprobs | None]]) -> list[Move]:
        """Slots for the next beams: a beam's first child stays in its slot (its KV in place); the
        others take the slots of beams with no child."""
        children: dict[int, list[int]] = {}
        for j, (_, _, parent, _) in enumerate(beams):
            children.setdefault(parent, []).append(j)
        free = [s for s in range(self.width) if s not in children]
        slot_of = {}
        for parent, js in children.items():
            slot_of[js[0]] = parent
            for j in js[1:]:
                slot_of[j] = free.pop(0)
        # from rank order to slot order
        by_slot = sorted(range(len(beams)), key=lambda j: slot_of[j])
        self.scores = [self.scores[j] for j in by_slot]
        self.ranks = by_slot
        return [Move(slot_of[j], parent, tok, entry) for j, (_, tok, parent, entry) in enumerate(beams)]
