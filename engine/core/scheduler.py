"""Continuous-batching scheduler (pure Python, no torch).

One rule for every step: each scheduled sequence gets
    min(num_tokens - num_computed_tokens, remaining token budget)
new tokens. A new sequence's first steps are its prefill (chunked if the budget is short),
later steps are decodes of one token, plus its draft tokens under speculative decoding (all
checked in the same pass; those rejected are rolled back after the step). Running sequences are
served first; when the pool runs out, the most recently admitted sequence is preempted (blocks
freed, recomputed later).

Optionally (prefill_cap > 0), while sequences decode, the prompt tokens of a step are also
capped, at max(prefill_cap, number of decoding sequences): a long prompt that arrives mid-stream
is then prefilled in small chunks beside the decodes, bounding how long running streams wait
between two tokens, at the cost of slower admission of bursts (measured in BENCHMARKS.md).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.core.beam import Move
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request, RequestStatus

POLICIES = ("fcfs", "priority")


def rank(req: Request) -> tuple[int, float]:
    """The priority policy's order: lower first."""
    return req.priority, req.arrival_time


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int
    block_ids: list[int]  # the sequence's block table after allocation (read-only)


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    preempted: list[Request] = field(default_factory=list)
    # sequences that ended since the previous step: the runner drops their per-sequence state
    finished_seq_ids: list[str] = field(default_factory=list)
    # beam search: KV blocks to copy (source, destination) before the step runs (forked beams)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # the pool ran short this step (preempted for want of blocks): nobody waiting is admitted
    short_of_blocks: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_cap: int = 0, long_rope_from: int | None = None, policy: str = "fcfs") -> None:
        assert policy in POLICIES
        self.kv = kv
        self.by_priority = policy == "priority"
        # longrope (Phi-3): a sequence longer than this is rotated by the long factors throughout;
        # one that grows past it while decoding is recomputed, as transformers drops its cache then
        self.long_rope_from = long_rope_from
        self.prefill_cap = prefill_cap
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # n > 1: the other sequences wait until the first has computed the prompt, then take its
        # blocks from the prefix cache like any hit (salted by the request when caching is off).
        self.pending_forks: dict[str, list[Request]] = {}
        self.seqs_by_request: dict[str, list[Request]] = {}
        self.num_preemptions = 0
        # prefix cache: prompt tokens looked up and found, over the sequences admitted
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self._prefill_left = max_num_batched_tokens  # prefill tokens this step may still take
        self._finished_since_step: list[str] = []
        self._block_copies: list[tuple[int, int]] = []

    # --- queries -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(f) for f in self.pending_forks.values())

    def has_unfinished(self) -> bool:
        return bool(self.seqs_by_request)

    # --- admission ----------------------------------------------------------------------
    def add(self, seqs: list[Request]) -> None:
        """Queue the sequences of one request; seqs[0] prefills the prompt for all of them."""
        first, rest = seqs[0], seqs[1:]
        assert first.request_id not in self.seqs_by_request, f"duplicate request {first.request_id}"
        self.seqs_by_request[first.request_id] = list(seqs)
        for s in rest:  # one rank for the request's sequences: they stay together in the running list
            s.arrival_time, s.priority = first.arrival_time, first.priority
        self._queue(first)
        if rest and first.beam is None:  # (the other beams start from the first's first step)
            self.pending_forks[first.seq_id] = rest
        if rest and not self.kv.enable_prefix_caching:  # keys that only this request's choices find
            for s in seqs:
                s.cache_salt = s.request_id

    # --- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(seqs=[], finished_seq_ids=self._finished_since_step, block_copies=self._block_copies)
        self._finished_since_step, self._block_copies = [], []
        self._prefill_left = self._prefill_allowance()
        if self.by_priority:
            self.running.sort(key=rank)  # the lowest-ranked last: the one _make_room preempts
            self._yield_to_waiting(out)
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.short_of_blocks:
            self._schedule_waiting(out, budget)
        if out.is_empty and self.waiting and self.running:
            self._unpark(out)
        return out

    def _queue(self, req: Request, front: bool = False) -> None:
        """Into the waiting queue: at its back (or `front`), or under the priority policy by rank."""
        if self.by_priority:
            at = next((i for i, w in enumerate(self.waiting) if rank(req) < rank(w)), len(self.waiting))
            self.waiting.insert(at, req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

    def _yield_to_waiting(self, out: SchedulerOutput) -> None:
        """Priority policy: while the first waiting request outranks the last running one and lacks
        a seat or the blocks for its tokens, that running request is preempted (beams are not)."""
        while self.waiting and self.running:
            first, last = self.waiting[0], self.running[-1]
            if rank(first) >= rank(last) or last.beam is not None:
                return
            no_seat = self._seats_taken() + 1 > self.max_num_seqs
            if not no_seat and self.kv.num_blocks_for(first.num_tokens) <= self.kv.pool.num_free:
                return
            self._preempt(self.running.pop())
            out.preempted.append(last)

    def _unpark(self, out: SchedulerOutput) -> None:
        """Nothing could run: every running sequence is a beam waiting for a sibling that waits for
        blocks or a seat. The last group's beams give their blocks back and queue at the back (to be
        recomputed after the others), one group at a time, until the queue's front can start."""
        while out.is_empty and self.running:
            last = self.running[-1]
            for req in [r for r in self.running if r is last or (r.beam is not None and r.beam is last.beam)]:
                self.running.remove(req)
                self._preempt(req, to_back=True)
                out.preempted.append(req)
            self._schedule_waiting(out, self.max_num_batched_tokens)

    def _prefill_allowance(self) -> int:
        """Prompt tokens this step may take. With a cap, a step beside running decodes takes at most
        max(cap, decodes), so for a cap up to the batch it costs the streams about two decode steps;
        unless more sequences wait to start than decode (a burst): stalling the few to start the
        many at once is worth more than smooth tokens for the few."""
        decodes = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        admissible = min(len(self.waiting), self.max_num_seqs - len(self.running))
        starting = len(self.running) - decodes + admissible
        if self.prefill_cap and decodes > starting:
            return max(self.prefill_cap, decodes)
        return self.max_num_batched_tokens

    def _chunk(self, req: Request, budget: int) -> int:
        """New tokens for req this step: all it has left, within the budget and the prefill cap;
        a decode's drafts too, as many as the budget holds (the rest are dropped)."""
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if n == 1 and req.draft_token_ids:
            if len(req.draft_token_ids) >= budget and req.draft_tree is not None:
                req.clear_drafts()  # a tree is run whole or not at all
            del req.draft_token_ids[budget - 1:]
            return 1 + len(req.draft_token_ids)
        return min(n, self._prefill_left) if n > 1 else n

    def _took(self, req: Request, n: int) -> None:
        if n - len(req.draft_token_ids) > 1:  # prompt tokens (drafts ride on a decode)
            self._prefill_left -= n
        if self.long_rope_from is not None and req.num_tokens > self.long_rope_from:
            req.long_rope_kv = True

    def _crossed_long_rope(self, req: Request) -> bool:
        """req's KV was computed under longrope's short factors, and it is now long."""
        return (self.long_rope_from is not None and req.num_computed_tokens > 0 and not req.long_rope_kv
                and req.num_tokens > self.long_rope_from)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._crossed_long_rope(req):
                self._preempt(self.running.pop(i))
                out.preempted.append(req)
                continue
            n = self._chunk(req, budget)
            if n == 0:  # a prompt still prefilling, and this step's prefill tokens are spent
                i += 1
                continue
            if req.draft_token_ids and not self.kv.allocate_slots(req.seq_id, req.num_computed_tokens + n):
                req.clear_drafts()  # drafts never preempt anyone: without them, the token alone
                n = 1
            if not self._make_room(req, n, out):
                break  # req itself was preempted; it was the last one running
            out.seqs.append(ScheduledSeq(req, n, self.kv.block_ids(req.seq_id)))
            self._took(req, n)
            budget -= n
            i += 1
        return budget

    def _make_room(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Allocate slots for n new tokens of req, preempting from the back of running if needed."""
        while not self.kv.allocate_slots(req.seq_id, req.num_computed_tokens + n):
            out.short_of_blocks = True
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _seats_taken(self) -> int:
        """Running sequences and the beams they will fork into (a beam group holds its width)."""
        return len(self.running) + sum(r.beam.width - 1 for r in self.running if r.beam and not r.beam.forked)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        starting: set[str] = set()  # beam groups with a beam starting from nothing this step
        while self.waiting and budget > 0:
            req = self.waiting[0]
            beams = req.beam.width if req.beam and not req.beam.forked else 1
            fresh = req.num_computed_tokens == 0  # new or preempted: its prefix may be cached
            # a group's preempted beams start one a step: the later ones then find the blocks they
            # share with the first in the prefix cache, instead of each computing its own
            if self._seats_taken() + beams > self.max_num_seqs or (req.beam and fresh and req.request_id in starting):
                break
            if req.beam and fresh:
                starting.add(req.request_id)
            if fresh:
                req.num_computed_tokens = self._take_cached_prefix(req)
            n = self._chunk(req, budget)
            if n == 0 or not self.kv.allocate_slots(req.seq_id, req.num_computed_tokens + n):
                if fresh:
                    self.kv.free(req.seq_id)
                    req.num_computed_tokens = 0
                break
            if fresh:
                self._count_prefix_hit(req)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, n, self.kv.block_ids(req.seq_id)))
            self._took(req, n)
            budget -= n

    def _take_cached_prefix(self, req: Request) -> int:
        # Prompt logprobs need the logits of every prompt position, contrastive search the hidden
        # states of every position, so nothing can be skipped.
        if req.params.prompt_logprobs is not None or req.params.contrastive:
            return 0
        return self.kv.take_cached_prefix(req.seq_id, req.token_ids, req.num_tokens - 1, req.cache_salt)

    def _count_prefix_hit(self, req: Request) -> None:
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += req.num_computed_tokens
        if req.num_cached_tokens is None:  # usage reports the first admission's hit
            req.num_cached_tokens = req.num_computed_tokens

    def _preempt(self, req: Request, to_back: bool = False) -> None:
        if req.beam is not None:
            req.beam.forget(req.index)
        self.kv.free(req.seq_id)
        req.num_computed_tokens = 0
        req.long_rope_kv = False
        req.clear_drafts()
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._queue(req, front=not to_back)

    # --- after the model ran ------------------------------------------------------------
    def update_after_step(self, out: SchedulerOutput, num_rejected: dict[str, int] | None = None) -> None:
        """Advance computed tokens; release forks whose parent has now computed its prompt.
        `num_rejected`: per sequence, the draft tokens the step rejected: their KV slots are
        computed no more (the next tokens overwrite them), and blocks that held only them go back
        to the pool."""
        for s in out.seqs:
            rejected = (num_rejected or {}).get(s.request.seq_id, 0)
            s.request.clear_drafts()
            s.request.num_computed_tokens += s.num_new_tokens - rejected
            if rejected:
                self.kv.free_tail(s.request.seq_id, s.request.num_computed_tokens + 1)
            self.kv.cache_full_blocks(s.request.seq_id, s.request.token_ids, s.request.num_computed_tokens,
                                      s.request.cache_salt)
            self.kv.free_passed(s.request.seq_id, s.request.num_computed_tokens, s.request.cache_salt)
            if s.request.num_computed_tokens >= s.request.num_prompt_tokens:
                self._release_forks(s.request)

    def move_beams(self, slots: list[Request], moves: list[Move]) -> None:
        """Give each beam slot its next beam (BeamGroup.step's moves). A beam that continues in its
        own slot keeps its blocks; a slot that takes another beam's history gives its blocks back and
        shares that beam's full blocks, with a copy of its partial last one (made by the runner
        before the next step). On the group's first step, slots 1.. join the running batch."""
        first_step = len(slots) > 1 and slots[1].status is RequestStatus.WAITING  # (later, every slot runs)
        parents = {m.parent: (slots[m.parent].token_ids, slots[m.parent].logprobs) for m in moves}
        moved = [m for m in moves if m.slot != m.parent]
        for m in moved:
            self.kv.free(slots[m.slot].seq_id)
        for m in moved:  # before a beam that stays in place appends to the history they copy
            req, parent = slots[m.slot], slots[m.parent]
            tokens, logprobs = parents[m.parent]
            req.token_ids, req.logprobs = list(tokens), list(logprobs)
            req.num_computed_tokens, copies = self.kv.fork(parent.seq_id, req.seq_id, parent.num_computed_tokens)
            self._block_copies += copies
            self._finished_since_step.append(req.seq_id)  # the runner's state of the slot is stale
        for m in moves:
            slots[m.slot].append_token(m.token)
            if m.logprobs is not None:
                slots[m.slot].logprobs.append(m.logprobs)
        if first_step:
            at = self.running.index(slots[0]) + 1
            for req in slots[1:]:
                req.status = RequestStatus.RUNNING
            self.running[at:at] = slots[1:]

    def _release_forks(self, parent: Request) -> None:
        """The parent's full prompt blocks are now registered: each sibling takes them as a
        prefix-cache hit and goes to the front of the queue, to compute the rest of the prompt (at
        least its last token, whose logits pick the sibling's first token)."""
        for child in reversed(self.pending_forks.pop(parent.seq_id, [])):
            child.num_computed_tokens = self._take_cached_prefix(child)
            self._queue(child, front=True)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """The one exit path: finished, aborted or failed, its blocks go back to the pool."""
        if req.is_finished:
            return
        req.status = RequestStatus.FINISHED
        req.clear_drafts()
        req.finish_reason = reason
        req.stop_reason = stop_reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.seq_id)
        self._finished_since_step.append(req.seq_id)
        seqs = self.seqs_by_request.get(req.request_id, [])
        if all(s.is_finished for s in seqs):
            self.seqs_by_request.pop(req.request_id, None)

    def abort(self, request_id: str, reason: str = "abort") -> list[Request]:
        """Finish every sequence of the request ("abort", or "error" when serving it failed);
        harmless if already gone."""
        seqs = self.seqs_by_request.get(request_id, [])
        if seqs:
            self.pending_forks.pop(seqs[0].seq_id, None)
        aborted = [s for s in seqs if not s.is_finished]
        for s in aborted:
            self.finish(s, reason)
        return aborted

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        assert len(self.running) <= self.max_num_seqs
        for req in self.running:
            assert req.status is RequestStatus.RUNNING
        for req in self.waiting:
            assert req.status is RequestStatus.WAITING
        live = {r.seq_id for r in self.running} | {r.seq_id for r in self.waiting}
        assert set(self.kv.block_tables) <= live, "a block table belongs to no live sequence"

