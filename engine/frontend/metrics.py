"""Prometheus metrics with vLLM's names under the `kvserve:` prefix, label `model_name`.

The engine calls these hooks from its step loop; gauges read the scheduler at scrape time.
Each engine gets its own registry, so several engines in one process never collide.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.core.request import Request

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
STATS_INTERVAL_S = 10.0  # between two stats lines in the log, as vLLM's


@dataclass
class Totals:
    """What the counters hold, as plain numbers the stats line reads (a counter's value is private)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [position in the draft]

    def copy(self) -> Totals:
        return replace(self, accepted_per_pos=list(self.accepted_per_pos))


class EngineMetrics:
    def __init__(self, model_name: str, scheduler, kv, speculative: bool = False) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def metric(kind, name, doc, extra=(), **kw):
            family = kind(f"kvserve:{name}", doc, labels + list(extra), registry=self.registry, **kw)
            # bound once: labels() is a locked dict lookup, too slow to repeat for every token
            return family if extra else family.labels(model_name)

        self._name = model_name
        self.totals = Totals()
        for name, doc, fn in (
            ("num_requests_running", "Sequences in the running batch.", lambda: scheduler.num_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", lambda: scheduler.num_waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", lambda: kv.usage),
        ):
            metric(Gauge, name, doc).set_function(fn)
        self.prompt_tokens = metric(Counter, "prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = metric(Counter, "generation_tokens", "Generated tokens.")
        self.success = metric(Counter, "request_success", "Finished requests by finish reason.",
                              extra=["finished_reason"])
        self.prefix_queries = metric(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = metric(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._scheduler = scheduler
        self._prefix_counted = (0, 0)  # (queries, hits) already added to the counters
        self.preemptions = metric(Counter, "num_preemptions", "Sequences preempted (blocks freed, recomputed).")
        self.ttft = metric(Histogram, "time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY)
        self.itl = metric(Histogram, "inter_token_latency_seconds", "Time between tokens of a sequence.",
                          buckets=_LATENCY)
        self.e2e = metric(Histogram, "e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY)
        self.queue = metric(Histogram, "request_queue_time_seconds", "Arrival to first scheduled.", buckets=_LATENCY)
        self.req_prompt = metric(Histogram, "request_prompt_tokens", "Prompt length of finished requests.",
                                 buckets=_TOKENS)
        self.req_gen = metric(Histogram, "request_generation_tokens", "Tokens generated per finished request.",
                              buckets=_TOKENS)
        self.iteration = metric(Histogram, "iteration_tokens_total", "Tokens computed per engine step.",
                                buckets=_TOKENS)
        self.speculative = speculative
        if speculative:
            self.drafts = metric(Counter, "spec_decode_num_drafts", "Drafts checked (a sequence's drafts in a step).")
            self.draft_tokens = metric(Counter, "spec_decode_num_draft_tokens", "Draft tokens checked.")
            self.accepted_tokens = metric(Counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.")
            self.accepted_per_pos = metric(Counter, "spec_decode_num_accepted_tokens_per_pos",
                                           "Draft tokens accepted, by their position in the draft.", extra=["position"])

    def on_step(self, num_batched_tokens: int, num_preempted: int, num_generated: int) -> None:
        self.iteration.observe(num_batched_tokens)
        self.generation_tokens.inc(num_generated)  # once a step: a counter's inc costs microseconds
        self.totals.generation_tokens += num_generated
        # the scheduler keeps totals; the counters get what was added since the last step
        queries, hits = self._scheduler.prefix_cache_queries, self._scheduler.prefix_cache_hits
        if queries != self._prefix_counted[0]:
            self.prefix_queries.inc(queries - self._prefix_counted[0])
            self.prefix_hits.inc(hits - self._prefix_counted[1])
            self._prefix_counted = (queries, hits)
        if num_preempted:
            self.preemptions.inc(num_preempted)

    def on_drafts(self, seqs, result) -> None:
        """After a step: the drafts its sequences carried and how many of each were accepted."""
        if not self.speculative or not result.num_rejected:
            return
        drafted = [(s.request.num_draft_candidates, len(result.sampled[s.request.seq_id]) - 1)
                   for s in seqs if s.request.seq_id in result.num_rejected]  # (draft tokens, accepted)
        accepted = [a for _, a in drafted]
        t = self.totals
        t.drafts += len(drafted)
        t.draft_tokens += sum(k for k, _ in drafted)
        t.accepted_tokens += sum(accepted)
        self.drafts.inc(len(drafted))
        self.draft_tokens.inc(sum(k for k, _ in drafted))
        self.accepted_tokens.inc(sum(accepted))
        t.accepted_per_pos += [0] * (max(k for k, _ in drafted) - len(t.accepted_per_pos))
        for pos in range(max(accepted, default=0)):
            here = sum(a > pos for a in accepted)
            t.accepted_per_pos[pos] += here
            self.accepted_per_pos.labels(self._name, str(pos)).inc(here)

    def on_token(self, req: Request, now: float) -> None:
        """Called after a token is appended; req.last_token_time is the previous token's time."""
        if req.num_output_tokens == 1:
            if req.index == 0:
                self.ttft.observe(now - req.arrival_time)
                self.prompt_tokens.inc(req.num_prompt_tokens)
                self.totals.prompt_tokens += req.num_prompt_tokens
        elif req.last_token_time is not None:
            self.itl.observe(now - req.last_token_time)

    def on_finished(self, seqs: list[Request]) -> None:
        first = seqs[0]
        name = self._name
        self.success.labels(name, first.finish_reason or "abort").inc()
        self.e2e.observe(time.monotonic() - first.arrival_time)
        if first.first_scheduled_time is not None:
            self.queue.observe(first.first_scheduled_time - first.arrival_time)
        self.req_prompt.observe(first.num_prompt_tokens)
        self.req_gen.observe(sum(s.num_output_tokens for s in seqs))


class StatsLog:
    """The periodic stats lines of the log, as vLLM's: throughput since the last line, the batch
    and the KV pool now; under speculative decoding, a second line with the drafts' acceptance."""

    def __init__(self, metrics: EngineMetrics, scheduler, kv, now: float, interval: float = STATS_INTERVAL_S) -> None:
        self.metrics, self.scheduler, self.kv = metrics, scheduler, kv
        self.interval = interval
        self._since = (now, metrics.totals.copy(), self._prefix())

    def _prefix(self) -> tuple[int, int]:
        return self.scheduler.prefix_cache_queries, self.scheduler.prefix_cache_hits

    def lines(self, now: float) -> list[str]:
        """The lines due at `now`: none before the interval has passed, or if nothing ran since."""
        then, before, (queries0, hits0) = self._since
        m, t, sched = self.metrics, self.metrics.totals, self.scheduler
        busy = sched.has_unfinished() or t.generation_tokens != before.generation_tokens
        if now - then < self.interval or not busy:
            return []
        queries, hits = self._prefix()
        self._since = (now, t.copy(), (queries, hits))
        dt = now - then
        out = [f"engine: prompt {(t.prompt_tokens - before.prompt_tokens) / dt:.1f} tok/s, generation "
               f"{(t.generation_tokens - before.generation_tokens) / dt:.1f} tok/s, {sched.num_running} running, "
               f"{sched.num_waiting} waiting, KV cache {100 * self.kv.usage:.1f}% used, prefix cache "
               f"hits {_percent(hits - hits0, queries - queries0)}"]
        if m.speculative:
            drafts, drafted = t.drafts - before.drafts, t.draft_tokens - before.draft_tokens
            accepted = t.accepted_tokens - before.accepted_tokens
            per_pos = [now_ - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
                       for i, now_ in enumerate(t.accepted_per_pos)]
            by_pos = ", ".join(f"{a / drafts:.2f}" for a in per_pos) if drafts else "-"
            length = f"{1 + accepted / drafts:.2f}" if drafts else "-"
            out.append(f"speculative decoding: {accepted} of {drafted} draft tokens accepted "
                       f"({_percent(accepted, drafted)}) in {drafts} drafts, mean accepted length {length}, "
                       f"acceptance by position {by_pos}")
        return out


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
