"""Speculative decoding's proposers: each step they give decoding sequences draft tokens, which the
model runner checks in the same forward pass as the sequence's next token, and the acceptance
below (accepted_path, move_kept_kv): the runner keeps the drafts the target would have picked
itself, so the output does not change.

ngram (prompt lookup, as vLLM's): the sequence's last n tokens, for n from prompt_lookup_max down
to prompt_lookup_min, are looked up in its earlier tokens; the tokens that followed their latest
earlier occurrence are the draft. One numpy comparison over the history per sequence and n, no
Python loop over tokens.

A sequence whose recent drafts were mostly rejected stops drafting for a while (each draft token
is a row of the step's pass, paid for whether kept or not): its acceptance is an average over its
drafts that favours the latest; below MIN_ACCEPTANCE it pauses, and each pause in a row is twice
as long as the one before, up to MAX_PAUSE steps, after which it drafts again to see.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.core.config import SpeculativeConfig
from engine.core.kv_cache_manager import slot
from engine.core.request import ProposerState, Request
from engine.core.scheduler import ScheduledSeq

# how far back a draft is looked for: bounds a step's cost on long sequences
MAX_LOOKBACK = 4096
MIN_ACCEPTANCE = 0.25  # accepted / drafted tokens, recent
RECENT_WEIGHT = 0.25  # the latest draft's share of the average
FIRST_PAUSE, MAX_PAUSE = 4, 256  # steps


@dataclass
class DraftHistory(ProposerState):
    """One sequence's recent acceptance (Request.spec_state)."""

    acceptance: float = 0.5  # recent accepted / drafted tokens; a new sequence starts halfway
    paused: int = 0  # steps left without drafts
    next_pause: int = FIRST_PAUSE

    def record(self, drafted: int, accepted: int) -> None:
        self.acceptance += RECENT_WEIGHT * (accepted / drafted - self.acceptance)
        if self.acceptance >= MIN_ACCEPTANCE:
            self.next_pause = FIRST_PAUSE
            return
        self.paused, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE)
        self.acceptance = MIN_ACCEPTANCE  # after the pause one good draft brings it back

    def may_draft(self) -> bool:
        if self.paused:
            self.paused -= 1
            return False
        return True


def can_draft(req: Request) -> bool:
    """Whether req's next tokens may be checked several at once: a decoding sequence whose sampler
    stages do not depend on the tokens before (penalties, grammars and bad words do; they are not drafted)."""
    return (req.num_tokens - req.num_computed_tokens == 1 and req.grammar is None and req.beam is None
            and not req.params.contrastive and not req.bad_words_ids
            and not req.params.needs_penalties and req.num_output_tokens + 1 < req.max_tokens)


def ngram_draft(tokens: np.ndarray, k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens
    (longest n first); [] when none occurs earlier."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[-n:]
        windows = sliding_window_view(tokens[:-1], n)  # [L - n, n]: every earlier n-gram but the suffix
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return tokens[start:start + k].tolist()
    return []


class Proposer:
    """Each step, before scheduling: `propose` sets the drafts of the running sequences; after
    the step: `record` learns what was kept (result: the runner's ModelRunnerOutput)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def drafting(self, running: list[Request]) -> bool:
        """No drafts past the batch size where speculation stops paying."""
        limit = self.config.disable_by_batch_size
        return limit is None or len(running) < limit

    def room(self, req: Request, k: int) -> int:
        """How many of k draft tokens fit: none past max_tokens or the context (the last token
        there is the target's own)."""
        return min(k, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)

    def propose(self, running: list[Request]) -> None:
        raise NotImplementedError

    def record(self, seqs, result) -> None:
        raise NotImplementedError


class NgramProposer(Proposer):
    def propose(self, running: list[Request]) -> None:
        c = self.config
        if not self.drafting(running):
            return
        for req in running:
            if not can_draft(req) or not _history(req).may_draft():
                continue
            k = self.room(req, c.num_speculative_tokens)
            if k <= 0:
                continue
            req.draft_token_ids = self.draft(req, k)

    def draft(self, req: Request, k: int) -> list[int]:
        c = self.config
        tokens = np.asarray(req.token_ids[-MAX_LOOKBACK:])
        return ngram_draft(tokens, k, c.prompt_lookup_max, c.prompt_lookup_min)

    def record(self, seqs, result) -> None:
        """After the step that checked the drafts (a ModelRunnerOutput): how many of each sequence's were kept."""
        for s in seqs:
            req = s.request
            if req.seq_id in result.num_rejected:
                _history(req).record(req.num_draft_candidates, len(result.sampled[req.seq_id]) - 1)


# a draft token the runner fills in before the step's pass (model_runner.ModelRunner._self_draft)
TO_DRAFT = -1


class SelfDraftProposer(NgramProposer):
    """draft_model "self": the target's first num_layers layers, its final norm and head draft k
    tokens, one at a time, at the start of the step that checks them (their slots are allocated
    by then). Those layers' keys and values at the draft positions are the target's own (the
    same weights, the same inputs), so the drafts need no cache of their own: the check rewrites
    them, and rolls back those not kept, as for any draft. Here each decoding sequence gets k
    places to fill, unless paused."""

    def draft(self, req: Request, k: int) -> list[int]:
        return [TO_DRAFT] * k


def _history(req: Request) -> DraftHistory:
    if req.spec_state is None:
        req.spec_state = DraftHistory()
    return req.spec_state


# --- acceptance: what the target kept of the drafts --------------------------------------
def accepted_path(req: Request, picks: list[int]) -> list[int]:
    """The drafts kept (indices), given the target's pick at the last token and each draft."""
    tree = req.draft_tree
    parents = range(-1, len(req.draft_token_ids) - 1) if tree is None else tree.parents
    path: list[int] = []
    node = -1
    while True:
        pick = picks[node + 1]
        child = next((i for i, p in enumerate(parents) if p == node and req.draft_token_ids[i] == pick), None)
        if child is None:
            return path
        path.append(child)
        node = child


def move_kept_kv(kv_caches: list[torch.Tensor], moves: list[tuple[ScheduledSeq, list[int]]],
                 block_size: int) -> None:
    """The kept drafts of a tree were computed in slots of their own: copy their keys and
    values to the slots that follow the last token, where the sequence reads them from now on."""
    src: list[int] = []
    dst: list[int] = []
    for s, path in moves:
        start = s.request.num_computed_tokens  # the last token's slot
        for k, d in enumerate(path, 1):
            for p, into in ((start + 1 + d, src), (start + k, dst)):
                into.append(slot(s.block_ids, p, block_size))
    device = kv_caches[0].device
    src_t, dst_t = (torch.tensor(x, dtype=torch.int64, device=device) for x in (src, dst))
    for cache in kv_caches:
        flat = cache.view(2, -1, *cache.shape[3:])  # [2, slots, kv_heads, D]
        flat[:, dst_t] = flat[:, src_t]  # (gathered before written: overlaps are safe)
