"""The sampler against direct per-row computations on a fixed logits tensor."""
import math

import pytest
import torch

from engine.runner.sampler import Sampler, SamplingMetadata, apply_penalties, mask_top_k_top_p_min_p, seeded_uniform

V = 40


def logits_fixture(rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(rows, V, generator=g) * 3


def metadata(rows: int, **fields) -> SamplingMetadata:
    base = dict(temperature=torch.ones(rows), top_k=None, top_p=None, min_p=None, uniforms=[None] * rows,
                presence_penalty=None, frequency_penalty=None, repetition_penalty=None, output_counts=None,
                seen_mask=None, logit_bias=None, banned=None, num_logprobs=[None] * rows)
    base.update(fields)
    return SamplingMetadata(**base)


def test_penalties_match_direct_computation():
    logits = logits_fixture(2)
    prompt = [[1, 2, 3], [5]]
    output = [[3, 3, 7], [5, 9, 9, 9]]
    pres, freq, rep = [0.5, -0.3], [0.2, 1.0], [1.3, 0.8]
    counts = torch.zeros(2, V)
    seen = torch.zeros(2, V, dtype=torch.bool)
    for i in range(2):
        for t in output[i]:
            counts[i, t] += 1
        seen[i, prompt[i] + output[i]] = True
    md = metadata(2, presence_penalty=torch.tensor(pres), frequency_penalty=torch.tensor(freq),
                  repetition_penalty=torch.tensor(rep), output_counts=counts, seen_mask=seen)
    got = apply_penalties(logits, md)
    for i in range(2):
        for t in range(V):
            x = logits[i, t].item()
            if t in prompt[i] or t in output[i]:
                x = x / rep[i] if x > 0 else x * rep[i]
            n = output[i].count(t)
            x -= freq[i] * n + pres[i] * (n > 0)
            assert got[i, t].item() == pytest.approx(x, abs=1e-5)


def _reference_keep(row: torch.Tensor, k: int, p: float, min_p: float) -> set[int]:
    order = sorted(range(V), key=lambda t: -row[t].item())[: (k or V)]
    probs = torch.softmax(row[order], dim=0).tolist()
    keep, mass = [], 0.0
    for t, pr in zip(order, probs):
        if mass > p:
            break
        keep.append((t, pr))
        mass += pr
    top = keep[0][1]
    return {t for t, pr in keep if pr >= min_p * top}


@pytest.mark.parametrize("k,p,min_p", [(0, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2),
                                       (10, 0.9, 0.05), (1, 0.5, 0.0)])
def test_top_k_top_p_min_p_keep_the_right_tokens(k, p, min_p):
    logits = logits_fixture()
    rows = logits.shape[0]
    out = mask_top_k_top_p_min_p(logits, torch.full((rows,), k or V), torch.full((rows,), p),
                                 torch.full((rows,), min_p))
    for i in range(rows):
        kept = {t for t in range(V) if out[i, t] != float("-inf")}
        assert kept == _reference_keep(logits[i], k, p, min_p)
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])


def test_greedy_respects_logit_bias_and_banned_tokens():
    logits = logits_fixture(2)
    best = logits.argmax(dim=-1)
    bias = torch.zeros(2, V)
    bias[0, 17] = 100.0
    banned = torch.zeros(2, V, dtype=torch.bool)
    banned[1, best[1]] = True
    tokens, _ = Sampler(torch.Generator())(logits, metadata(2, temperature=torch.zeros(2), logit_bias=bias,
                                                             banned=banned))
    second = logits[1].clone()
    second[best[1]] = float("-inf")
    assert tokens == [17, second.argmax().item()]


def test_seeded_rows_are_batch_invariant():
    logits = logits_fixture(4)

    def draw(rows: list[int], seeds: list[int | None], steps: int = 6) -> list[list[int]]:
        def md(step: int) -> SamplingMetadata:  # as the runner builds it at output position `step`
            return metadata(len(rows), temperature=torch.full((len(rows),), 0.9),
                            top_p=torch.full((len(rows),), 0.95),
                            uniforms=[None if s is None else seeded_uniform(s, 0, step) for s in seeds])

        sampler = Sampler(torch.Generator().manual_seed(99))
        return [sampler(logits[rows], md(step))[0] for step in range(steps)]

    alone = [step[0] for step in draw([2], [7])]
    batched = [step[1] for step in draw([0, 2, 3], [None, 7, 11])]
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits / 0.7, dim=-1)[0]
    sampler = Sampler(torch.Generator().manual_seed(0))
    md = metadata(1, temperature=torch.tensor([0.7]))
    counts = [0] * 4
    n = 4000
    for _ in range(n):
        counts[sampler(logits, md)[0][0]] += 1
    for c, p in zip(counts, probs.tolist()):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_logprobs_are_raw_and_ranked():
    logits = logits_fixture(2)
    md = metadata(2, temperature=torch.zeros(2), num_logprobs=[3, None],
                  logit_bias=torch.zeros(2, V).index_fill_(1, torch.tensor([5]), 50.0))
    tokens, lps = Sampler(torch.Generator())(logits, md)
    raw = logits.log_softmax(dim=-1)
    assert tokens[0] == 5 and lps[1] is None
    lp = lps[0]
    assert lp.logprob == pytest.approx(raw[0, 5].item(), abs=1e-6)
    assert lp.rank == int((raw[0] > raw[0, 5]).sum()) + 1
    assert [t for t, _ in lp.top] == raw[0].topk(3).indices.tolist()


def test_seeded_draws_follow_the_distribution_and_never_pick_masked_tokens():
    """A seeded row's numbers, over its output positions, sample the row's distribution; the
    extremes of [0, 1) still land on tokens that may be drawn."""
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")]])
    probs = torch.softmax(logits / 0.7, dim=-1)[0]
    sampler = Sampler(torch.Generator().manual_seed(0))
    n, counts = 4000, [0] * 6
    for pos in range(n):
        counts[sampler(logits, metadata(1, temperature=torch.tensor([0.7]),
                                        uniforms=[seeded_uniform(2**64 - 1, 1, pos)]))[0][0]] += 1
    for c, p in zip(counts, probs.tolist()):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3
    for u in (0.0, 1.0 - 2**-53):
        token = sampler(logits, metadata(1, temperature=torch.tensor([0.7]), uniforms=[u]))[0][0]
        assert probs[token] > 0


def test_seeded_uniforms_differ_by_seed_choice_and_position():
    values = {seeded_uniform(s, c, p) for s in (0, 1, 2**63) for c in (0, 1) for p in range(50)}
    assert len(values) == 300 and all(0.0 <= v < 1.0 for v in values)


def test_greedy_is_argmax_ties_included():
    """The greedy pick (max's index, faster than argmax on CPU) is argmax's: the first of tied maxima."""
    from engine.runner.sampler import greedy

    logits = torch.randn(33, 49152)
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, float("-inf")]])
    assert greedy(tied).tolist() == tied.argmax(dim=-1).tolist() == [1, 0, 0]
