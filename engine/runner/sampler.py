"""Batched sampling: penalties, logit bias, min_tokens, greedy or random with top-k/top-p/min-p.

A random row draws one uniform number and takes the token whose interval of the cumulative
distribution holds it (inverse-CDF sampling). A seeded row's number is a hash of (seed, choice,
output position): counter-based, so it is the same alone or in any batch, after a preemption or a
retried step, and needs no generator state per request. Unseeded rows draw from one generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.request import TokenLogprobs


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

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())


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
        tokens = logits.argmax(dim=-1)
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
