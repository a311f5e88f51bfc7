"""Contrastive search (Su et al., 2022), as transformers' `generate(penalty_alpha=a, top_k=k)`.

A sequence's next token is the one of the k most probable that maximises
    (1 - a) * p(v) - a * max_j cos(h_v, h_j)
where h_v is the last-layer hidden state of v placed after the sequence and h_j runs over the
hidden states of every earlier position (prompt included). Each step runs the sequence's last token
and its k candidates (the top k after it, from the step before) in one pass: the candidates are a
draft tree of k single-token branches, each seeing the history, the last token and itself, so one
forward gives every h_v, and the chosen one's logits give the next step's candidates. The chosen
token is then the sequence's new last token, recomputed with the next candidates (its branch's KV
slot is rolled back with the others'), so the scheduler's one rule holds unchanged.

Where a step computes a sequence's last token without candidates (its prefill, or a step whose
budget could not hold the tree), the candidates come from that token's logits and the token is
rolled back, to be computed again beside them.

The hidden states of every position are kept per sequence on the runner: hidden_size float32
values a token (2.3 KB for SmolLM2-135M), up to max_model_len tokens, freed when it finishes.
"""
from __future__ import annotations

import torch

from engine.core.request import ContrastiveCandidates, DraftTree, Request
from engine.runner.batch import SampleRow
from engine.runner.runner_output import ModelRunnerOutput
from engine.runner.sampler import top_entries


def propose(running: list[Request]) -> None:
    """Give each decoding contrastive sequence its candidates as this step's draft tree."""
    for req in running:
        cands = req.contrastive_next
        if cands is None or req.num_tokens - req.num_computed_tokens != 1:
            continue
        k = len(cands.token_ids)
        req.draft_token_ids = list(cands.token_ids)
        req.draft_tree = DraftTree(offsets=[1] * k, sees=[()] * k, parents=[None] * k)


def candidates(logits: torch.Tensor, reqs: list[Request], num_outputs: list[int]) -> list[ContrastiveCandidates]:
    """logits [R, V]: the next token's distribution for each row; num_outputs[i]: output tokens
    before that token (min_tokens bans EOS and stop ids before softmax, as transformers' processor)."""
    logits = logits.float().clone()
    for i, (req, done) in enumerate(zip(reqs, num_outputs)):
        if done < req.params.min_tokens and req.min_tokens_banned:
            logits[i, list(req.min_tokens_banned)] = float("-inf")
    probs = logits.softmax(dim=-1)  # [R, V]
    logprobs = logits.log_softmax(dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
    want = max(max(r.params.top_k, r.params.logprobs or 0) for r in reqs)
    top_p, top_ids = probs.topk(want, dim=-1)  # [R, want] best first
    out = []
    for i, req in enumerate(reqs):
        k, n = req.params.top_k, req.params.logprobs
        ids, ps = top_ids[i].tolist(), top_p[i].tolist()
        entries = None if n is None else top_entries(ids, logprobs[i, top_ids[i]].tolist(), k, n)
        out.append(ContrastiveCandidates(ids[:k], ps[:k], entries))
    return out


def pick(context: torch.Tensor, hidden: torch.Tensor, probs: list[float], alpha: float) -> int:
    """context [L, H]: the hidden states of the positions before; hidden [k, H]: the candidates'.
    The candidate with the best contrastive score (the first of equals)."""
    ctx = context / context.norm(dim=-1, keepdim=True)
    cand = hidden / hidden.norm(dim=-1, keepdim=True)
    penalty = (cand @ ctx.T).max(dim=-1).values  # [k]
    p = torch.tensor(probs, dtype=torch.float32, device=hidden.device)
    return int(((1.0 - alpha) * p - alpha * penalty).argmax())


def choose(logits: torch.Tensor, rows: list[SampleRow], hidden: torch.Tensor, states: HiddenStates,
           out: ModelRunnerOutput) -> None:
    """logits [R, V] of contrastive rows: a sequence's last token and, in a candidates step, its
    k candidates after it. Chooses among the candidates, and finds the next step's candidates."""
    by_seq: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_seq.setdefault(r.seq.request.seq_id, []).append(i)
    next_rows: list[int] = []
    reqs: list[Request] = []
    num_outputs: list[int] = []
    for seq_rows in by_seq.values():
        req = rows[seq_rows[0]].seq.request
        if len(seq_rows) == 1:  # the last token without candidates: computed again beside them
            out.num_rejected[req.seq_id] = 1
            next_rows.append(seq_rows[0])
            reqs.append(req)
            num_outputs.append(req.num_output_tokens)
            continue
        cands = req.contrastive_next
        assert cands is not None  # (a candidates step follows the step that found them)
        context = states.context(req.seq_id, req.num_computed_tokens + 1)  # [L, H]
        branch = [rows[i].row for i in seq_rows[1:]]
        chosen = pick(context, hidden[branch], cands.probs, req.params.penalty_alpha)
        out.sampled[req.seq_id] = [cands.token_ids[chosen]]
        if cands.entries is not None:
            out.logprobs[req.seq_id] = [cands.entries[chosen]]
        out.num_rejected[req.seq_id] = len(branch)  # every branch's slot (the chosen one is the next last token)
        next_rows.append(seq_rows[1 + chosen])
        reqs.append(req)
        num_outputs.append(req.num_output_tokens + 1)
    for req, cands in zip(reqs, candidates(logits[next_rows], reqs, num_outputs)):
        out.contrastive[req.seq_id] = cands


class HiddenStates:
    """Each contrastive sequence's last-layer hidden state at every position, [capacity, H],
    grown by doubling up to max_model_len."""

    def __init__(self, hidden_size: int, max_len: int, device: torch.device) -> None:
        self.hidden_size, self.max_len, self.device = hidden_size, max_len, device
        self.states: dict[str, torch.Tensor] = {}

    def write(self, seq_id: str, start: int, hidden: torch.Tensor) -> None:
        """hidden [n, H]: positions start .. start + n - 1."""
        end = start + hidden.shape[0]
        buf = self.states.get(seq_id)
        if buf is None or buf.shape[0] < end:
            size = min(self.max_len, max(end, 2 * (0 if buf is None else buf.shape[0]), 64))
            new = torch.empty(size, self.hidden_size, dtype=torch.float32, device=self.device)
            if buf is not None:
                new[:buf.shape[0]] = buf
            self.states[seq_id] = buf = new
        buf[start:end] = hidden.float()

    def context(self, seq_id: str, length: int) -> torch.Tensor:
        return self.states[seq_id][:length]

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.states.pop(seq_id, None)
