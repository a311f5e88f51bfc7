"""Beam search's step on the runner: each beam slot's best continuations, from its logits.

The group's rules (which continuations become beams, which finish, when the search ends) are
pure Python in engine/core/beam.py; this is the part that needs the logits.
"""
from __future__ import annotations

import torch

from engine.core.beam import Candidates
from engine.core.request import Request
from engine.runner.runner_output import ModelRunnerOutput
from engine.runner.sampler import top_entries


def candidates(logits: torch.Tensor, reqs: list[Request], out: ModelRunnerOutput) -> None:
    """logits [R, V] of beam slots -> each slot's best continuations: log-softmax, then the
    min_tokens ban (transformers applies its processors to the log-probabilities, unnormalised)."""
    lps = logits.float().log_softmax(dim=-1)  # [R, V]
    for i, req in enumerate(reqs):
        if req.num_output_tokens < req.params.min_tokens and req.min_tokens_banned:
            lps[i, list(req.min_tokens_banned)] = float("-inf")
    want = max(max(r.beam.keep, r.params.logprobs or 0) for r in reqs)
    top_lps, top_ids = (t.tolist() for t in lps.topk(min(want, lps.shape[1]), dim=-1))  # [R, want] best first
    for req, ids, values in zip(reqs, top_ids, top_lps):
        keep, n = req.beam.keep, req.params.logprobs
        entries = None if n is None else top_entries(ids, values, keep, n)
        out.beam_candidates[req.seq_id] = Candidates(ids[:keep], values[:keep], entries)
