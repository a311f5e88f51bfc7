"""Sampling with drafts keeps the target's distribution: on a tiny random model with a vocabulary
of 16, the first three tokens of many seeded requests (the second and third drafted, as a chain
or as a tree: a candidate that is often right, one that often is not), against the exact joint
distribution computed by transformers (chi-square; fixed seeds, so the test is deterministic)."""
from __future__ import annotations

import math

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.request import DraftTree
from engine.runner.spec_decode import Proposer, can_draft
from tests.engine.test_models import TINY

VOCAB = 16
PROMPT = [3, 5, 3, 5, 3]
SAMPLES = 3000


def _tiny(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **{**TINY, "vocab_size": VOCAB, "initializer_range": 0.15},
                               tie_word_embeddings=False)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model


@torch.no_grad()
def _joint(hf) -> torch.Tensor:
    """[16, 16, 16]: P(tokens a, b, c after PROMPT) at temperature 1, float64."""
    def next_probs(prefixes: list[list[int]]) -> torch.Tensor:
        return hf(torch.tensor(prefixes)).logits[:, -1].double().softmax(-1)  # [len(prefixes), V]

    p1 = next_probs([PROMPT])[0]  # [V]
    p2 = next_probs([PROMPT + [a] for a in range(VOCAB)])  # [V, V]
    p3 = next_probs([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


class _Likely(Proposer):
    """After the first token: drafts the likeliest second token and the likeliest third after it
    (a chain), or, as a tree, also the second likeliest second token as another candidate."""

    def __init__(self, joint: torch.Tensor, tree: bool) -> None:
        self.joint, self.tree = joint, tree

    def propose(self, running) -> None:
        for req in running:
            if not can_draft(req) or req.num_output_tokens != 1:
                continue
            given = self.joint[req.output_token_ids[0]]  # [V, V]: P(a, b, c) for this a
            seconds = given.sum(1).argsort(descending=True).tolist()
            req.draft_token_ids = [seconds[0], int(given[seconds[0]].argmax())]
            if self.tree:
                req.draft_token_ids.append(seconds[1])
                req.draft_tree = DraftTree(offsets=[1, 2, 1], sees=[(), (0,), ()], parents=[-1, 0, -1])

    def record(self, seqs, result) -> None:
        pass


def _chi2_quantile(q_z: float, dof: int) -> float:
    """Wilson-Hilferty: the chi-square quantile whose normal deviate is q_z."""
    return dof * (1 - 2 / (9 * dof) + q_z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_sampled_tokens_follow_the_targets_distribution(tmp_path, smollm2_tokenizer, tree):
    joint = _joint(_tiny(tmp_path, smollm2_tokenizer))
    llm = LLM(str(tmp_path), num_kv_blocks=512, block_size=4, max_num_seqs=128,
              speculative_config={"method": "ngram", "disable_by_batch_size": None})
    llm.engine.proposer = _Likely(joint, tree)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=4, ignore_eos=True) for s in range(SAMPLES)]
    counts = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    for out in llm.generate([PROMPT] * SAMPLES, params):
        a, b, c = out.outputs[0].token_ids[:3]
        counts[a, b, c] += 1
    m = llm.engine.metrics
    drafted, accepted = m.draft_tokens._value.get(), m.accepted_tokens._value.get()
    assert 0 < accepted < drafted  # drafts both kept and rejected
    # cells expected fewer than 5 times are pooled into one
    expected = (joint * SAMPLES).flatten()
    observed = counts.flatten()
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    o = torch.cat([observed[big], observed[~big].sum()[None]])
    chi2 = float(((o - e) ** 2 / e).sum())
    dof = len(e) - 1
    assert dof >= 20  # a spread distribution: the test can tell
    assert chi2 < _chi2_quantile(3.09, dof), f"chi2 {chi2:.1f} on {dof} degrees of freedom"  # p > 0.001
    # ...and the same statistic would see a wrong distribution: the third token drawn as if the
    # second were the likeliest
    p_ab = joint.sum(2)  # [V, V]
    after_best = joint[torch.arange(VOCAB), p_ab.argmax(1)] / p_ab.max(1).values[:, None]  # [V, V]: P(c | a, best b)
    wrong = p_ab[:, :, None] * after_best[:, None, :]
    w = (wrong * SAMPLES).flatten()
    we = torch.cat([w[big], w[~big].sum()[None]])
    assert float(((o - we) ** 2 / we).sum()) > _chi2_quantile(3.09, dof)
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks
