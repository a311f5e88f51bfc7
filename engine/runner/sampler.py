"""Batched sampling: penalties, logit bias, min_tokens, greedy or random with top-k/top-p/min-p.

The whole logits pipeline lives here: SamplingInputs turns a step's requests into the tensors
of SamplingMetadata, and Sampler applies each stage in order and picks the tokens.

A random row draws one uniform number and takes the token whose interval of the cumulative
distribution holds it (inverse-CDF sampling). A seeded row's number is a hash of (seed, choice,
output position): counter-based, so it is the same alone or in any batch, after a preemption or a
retried step, and needs no generator state per request. Unseeded rows draw from one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.outputs import TokenLogprobs
from engine.core.request import Request
from engine.runner.grammar import apply_bitmask, fill_bitmask


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor | None  # [B] int64, vocab size = off; None when no row uses it
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    # per row: the uniform number of a seeded row (seeded_uniform), None = draw from the shared generator
    uniforms: list[float | None]
    presence_penalty: torch.Tensor | None  # [B]; the four penalty fields are None together
    frequency_penalty: torch.Tensor | None  # [B]
    repetition_penalty: torch.Tensor | None  # [B]
    output_counts: torch.Tensor | None  # [B, V] float32, occurrences of each token in the output
    seen_mask: torch.Tensor | None  # [B, V] bool, token occurs in prompt or output
    logit_bias: torch.Tensor | None  # [B, V] float32, added to the logits
    banned: torch.Tensor | None  # [B, V] bool, tokens that may not be picked (min_tokens)
    num_logprobs: list[int | None]  # per row: top alternatives wanted, None = no logprobs
    # every row has temperature 0: known from the params, so no reduction on the device (a sync on CUDA)
    all_greedy: bool = False
    # [B, ceil(V / 32)] int32, structured outputs: bit t of a row set = token t may come next
    grammar_bitmask: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """logits [B, V] -> penalised copy (vLLM/OpenAI semantics)."""
    rep = md.repetition_penalty[:, None]
    logits = torch.where(md.seen_mask, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalty[:, None] * md.output_counts
    return logits - md.presence_penalty[:, None] * (md.output_counts > 0).float()


def mask_top_k_top_p_min_p(logits: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """logits [B, V] (already temperature-scaled) -> logits with excluded tokens at -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    if top_k is not None:
        remove |= ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    if top_p is not None:
        # drop a token once the tokens before it already hold top_p of the mass (keep the first)
        before = probs.cumsum(dim=-1) - probs
        remove |= (before > top_p[:, None]) & (ranks > 0) & (top_p < 1.0)[:, None]
    if min_p is not None:
        remove |= probs < min_p[:, None] * probs[:, :1]
    mask = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


class SamplingInputs:
    """Builds each step's SamplingMetadata. A penalised sequence's output-token counts and
    seen-token mask are kept between steps and brought up to date with the tokens added since
    (rebuilding them from the whole output each step grew with its length)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        # seq_id -> (counts [V] float32, seen [V] bool, output tokens counted so far)
        self._penalty_rows: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        # seq_id -> its allowed_token_ids as a tensor, made once (a list may hold 2**18 ids)
        self._allowed: dict[str, torch.Tensor] = {}

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self._penalty_rows.pop(seq_id, None)
            self._allowed.pop(seq_id, None)

    def build(self, reqs: list[Request], offsets: list[int] | None = None) -> SamplingMetadata:
        """`offsets`: per row, how many of its request's drafts come before the token it picks
        (the row picks output token num_output_tokens + offset); rows with drafts have no
        penalties and no grammar (the engine drafts only for such sequences)."""
        offsets = offsets or [0] * len(reqs)
        params = [r.params for r in reqs]
        md = SamplingMetadata(
            temperature=self._floats([p.temperature for p in params]),
            top_k=self._ints([p.top_k or self.vocab_size for p in params]) if any(p.top_k for p in params) else None,
            top_p=self._floats([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
            min_p=self._floats([p.min_p for p in params]) if any(p.min_p > 0.0 for p in params) else None,
            uniforms=[None if r.params.seed is None else seeded_uniform(r.params.generator_seed, r.index,
                                                                         r.num_output_tokens + j)
                      for r, j in zip(reqs, offsets)],
            presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
            output_counts=None, seen_mask=None, logit_bias=self._logit_bias(reqs), banned=self._banned(reqs, offsets),
            num_logprobs=[p.logprobs for p in params], all_greedy=all(p.temperature == 0 for p in params),
            grammar_bitmask=self._grammar_bitmask(reqs))
        if any(p.needs_penalties for p in params):
            self._penalties(reqs, md)
        return md

    def _floats(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _ints(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _logit_bias(self, reqs: list[Request]) -> torch.Tensor | None:
        if not any(r.params.logit_bias for r in reqs):
            return None
        bias = torch.zeros(len(reqs), self.vocab_size, device=self.device)  # [B, V]
        for i, r in enumerate(reqs):
            for tok, value in (r.params.logit_bias or {}).items():
                if 0 <= tok < self.vocab_size:
                    bias[i, tok] += value
        return bias

    def _grammar_bitmask(self, reqs: list[Request]) -> torch.Tensor | None:
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not rows:
            return None
        return fill_bitmask([reqs[i].grammar for i in rows], rows, len(reqs), self.vocab_size)

    def _banned(self, reqs: list[Request], offsets: list[int]) -> torch.Tensor | None:
        """[B, V] bool: tokens a row may not pick: all but its allowed_token_ids, the last token of a
        bad word whose other tokens end its output, and EOS and stop tokens while short of min_tokens."""
        rows = [(i, r, _banned_ids(r, j)) for i, (r, j) in enumerate(zip(reqs, offsets))]
        rows = [(i, r, ids) for i, r, ids in rows if ids or r.params.allowed_token_ids is not None]
        if not rows:
            return None
        banned = torch.zeros(len(reqs), self.vocab_size, dtype=torch.bool, device=self.device)
        for i, r, ids in rows:
            if r.params.allowed_token_ids is not None:
                banned[i] = True
                banned[i, self._allowed_ids(r)] = False
            banned[i, [t for t in ids if 0 <= t < self.vocab_size]] = True
        return banned

    def _allowed_ids(self, req: Request) -> torch.Tensor:
        ids = self._allowed.get(req.seq_id)
        if ids is None:
            ids = self._allowed[req.seq_id] = self._ints([t for t in req.params.allowed_token_ids
                                                          if t < self.vocab_size])
        return ids

    def _penalties(self, reqs: list[Request], md: SamplingMetadata) -> None:
        md.presence_penalty = self._floats([r.params.presence_penalty for r in reqs])
        md.frequency_penalty = self._floats([r.params.frequency_penalty for r in reqs])
        md.repetition_penalty = self._floats([r.params.repetition_penalty for r in reqs])
        rows = [self._penalty_row(r) for r in reqs]
        md.output_counts = torch.stack([counts for counts, _ in rows])  # [B, V]
        md.seen_mask = torch.stack([seen for _, seen in rows])  # [B, V]

    def _penalty_row(self, req: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """req's output counts [V] and seen mask [V], up to date with its output; zeros for a row
        without penalties (the pipeline leaves such a row as it is)."""
        if not req.params.needs_penalties:
            return (torch.zeros(self.vocab_size, device=self.device),
                    torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device))
        entry = self._penalty_rows.get(req.seq_id)
        if entry is None:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[self._ints(req.prompt_token_ids)] = True
            entry = (torch.zeros(self.vocab_size, device=self.device), seen, 0)
        counts, seen, done = entry
        if done < req.num_output_tokens:
            new = self._ints(req.token_ids[req.num_prompt_tokens + done:])
            counts.index_add_(0, new, torch.ones(len(new), device=self.device))
            seen[new] = True
        self._penalty_rows[req.seq_id] = (counts, seen, req.num_output_tokens)
        return counts, seen


def _banned_ids(req: Request, offset: int) -> list[int]:
    """The tokens banned for req's row by min_tokens and bad words (`offset`: drafts before the row)."""
    ids = list(req.min_tokens_banned) if req.num_output_tokens + offset < req.params.min_tokens else []
    for word in req.bad_words_ids:  # (rows with bad words have no drafts: offset is 0)
        k = len(word) - 1
        if k == 0 or (req.num_output_tokens >= k and req.token_ids[-k:] == list(word[:-1])):
            ids.append(word[-1])
    return ids


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64, each row's first largest logit: argmax's answer. On CPU argmax is a
    scalar loop (1.4 ms at 32 rows of SmolLM2's 49k vocabulary), max's index reduction about half
    that; on CUDA both are one kernel."""
    return logits.max(dim=-1).indices


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for rows without a seed of their own

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [B, V] float32 -> chosen token per row and, where asked, its logprobs."""
        wants_logprobs = any(n is not None for n in md.num_logprobs)
        raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None  # before any processing
        if md.seen_mask is not None:
            logits = apply_penalties(logits, md)
        if md.logit_bias is not None:
            logits = logits + md.logit_bias
        if md.banned is not None:
            logits = logits.masked_fill(md.banned, float("-inf"))
        if md.grammar_bitmask is not None:
            logits = logits.clone()  # (in place below; the caller's logits stay as they were)
            apply_bitmask(logits, md.grammar_bitmask)
        tokens = greedy(logits)
        if not md.all_greedy:
            tokens = torch.where(md.temperature == 0, tokens, self._sample(logits, md))
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return token_list, [None] * len(token_list)
        return token_list, logprobs_of(raw_logprobs, tokens, md.num_logprobs)

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        temp = torch.where(md.temperature == 0, torch.ones_like(md.temperature), md.temperature)
        logits = logits / temp[:, None]
        if md.top_k is not None or md.top_p is not None or md.min_p is not None:
            logits = mask_top_k_top_p_min_p(logits, md.top_k, md.top_p, md.min_p)
        probs = logits.softmax(dim=-1)
        # float64: float32 sums over a 50k vocabulary drift by ~1e-5, which would bias the tail
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [B, V]
        u = self._uniforms(md.uniforms, probs.device)  # [B] in [0, 1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        return tokens.clamp_(max=probs.shape[-1] - 1)

    def _uniforms(self, given: list[float | None], device: torch.device) -> torch.Tensor:
        """[B] float64: the seeded rows' numbers, the others drawn (on the device, without a sync)."""
        u = torch.tensor([0.0 if x is None else x for x in given], dtype=torch.float64, device=device)
        unseeded = [i for i, x in enumerate(given) if x is None]
        if unseeded:
            u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64, generator=self.generator,
                                     device=self.generator.device).to(device)
        return u


_MASK64 = (1 << 64) - 1


def seeded_uniform(seed: int, choice: int, position: int) -> float:
    """A number in [0, 1) fixed by (seed, choice index, output position): splitmix64's finaliser
    over the three, its top 53 bits."""
    x = seed & _MASK64
    for part in (choice, position):
        x = _splitmix64((x ^ (part * 0x9E3779B97F4A7C15)) & _MASK64)
    return (_splitmix64(x) >> 11) / float(1 << 53)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def logprobs_of(logprobs: torch.Tensor, tokens: torch.Tensor, num_top: list[int | None]) -> list[TokenLogprobs | None]:
    """logprobs [N, V], tokens [N] -> per row the chosen token's logprob, rank and top-n list."""
    k = max([n for n in num_top if n is not None] + [0])
    chosen = logprobs.gather(1, tokens[:, None])  # [N, 1]
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    chosen, top_vals, top_ids, token_list = chosen[:, 0].tolist(), top_vals.tolist(), top_ids.tolist(), tokens.tolist()
    out: list[TokenLogprobs | None] = []
    for i, n in enumerate(num_top):
        if n is None:
            out.append(None)
        else:
            top = list(zip(top_ids[i][:n], top_vals[i][:n]))
            out.append(TokenLogprobs(token_list[i], chosen[i], ranks[i], top))
    return out


def top_entries(ids: list[int], logprobs: list[float], k: int, n: int) -> list[TokenLogprobs]:
    """The logprobs entries of the first k of a row's most likely tokens (ids and their logprobs,
    best first, at least max(k, n) of them): rank 1 + how many are more likely, the top n beside."""
    top = list(zip(ids[:n], logprobs[:n]))
    return [TokenLogprobs(t, lp, logprobs.index(lp) + 1, top) for t, lp in zip(ids[:k], logprobs[:k])]
