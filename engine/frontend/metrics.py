"""Prometheus metrics with vLLM's names under the `kvserve:` prefix, label `model_name`.

The engine calls these hooks from its step loop; gauges read the scheduler at scrape time.
Each engine gets its own registry, so several engines in one process never collide.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.core.request import Request

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class EngineMetrics:
    def __init__(self, model_name: str, scheduler, kv, speculative: bool = False) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def metric(kind, name, doc, extra=(), **kw):
            family = kind(f"kvserve:{name}", doc, labels + list(extra), registry=self.registry, **kw)
            # bound once: labels() is a locked dict lookup, too slow to repeat for every token
            return family if extra else family.labels(model_name)

        self._name = model_name
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
        drafted = [(len(s.request.draft_token_ids), result.num_rejected[s.request.seq_id])
                   for s in seqs if s.request.seq_id in result.num_rejected]  # (draft tokens, rejected)
        accepted = [k - rejected for k, rejected in drafted]
        self.drafts.inc(len(drafted))
        self.draft_tokens.inc(sum(k for k, _ in drafted))
        self.accepted_tokens.inc(sum(accepted))
        for pos in range(max(accepted, default=0)):
            self.accepted_per_pos.labels(self._name, str(pos)).inc(sum(a > pos for a in accepted))

    def on_token(self, req: Request, now: float) -> None:
        """Called after a token is appended; req.last_token_time is the previous token's time."""
        if req.num_output_tokens == 1:
            if req.index == 0:
                self.ttft.observe(now - req.arrival_time)
                self.prompt_tokens.inc(req.num_prompt_tokens)
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
