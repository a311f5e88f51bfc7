"""Contrastive search equals a reference built from the paper's formula on transformers' forwards
(on its own cache), token for token, alone, batched, staggered and under preemption."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from tests.engine.test_beam_search import _run_staggered
from tests.engine.test_correctness import GREEDY, _assert_same

MAX_NEW = 16
# (prompt: an index into reference_prompts or "hello", penalty_alpha, top_k, extras); the answer to
# "hello" (a chat prompt) ends on EOS within MAX_NEW at (0.6, 4); min_tokens holds it back
CASES = [(0, 0.6, 4, {}), (4, 0.4, 6, {}), (5, 0.6, 6, {"logprobs": 3}), (6, 0.4, 4, {}),
         ("hello", 0.6, 4, {}), ("hello", 0.6, 4, {"min_tokens": 15})]


def _params(case) -> SamplingParams:
    _, alpha, k, extra = case
    return SamplingParams(penalty_alpha=alpha, top_k=k, temperature=0.0, max_tokens=MAX_NEW, **extra)


def reference(model, prompt: list[int], alpha: float, k: int, eos: set[int], min_tokens: int = 0):
    """(tokens, logprob of each): each step, the k most probable next tokens (EOS banned before
    min_tokens) and the hidden state of each placed after the sequence; the next token maximises
    (1 - alpha) * p - alpha * (the largest cosine similarity with an earlier position's hidden state).
    Each step runs the k candidates after the sequence on transformers' cache, copied k times; the
    chosen row's cache, last hidden state and logits carry on."""
    ids, out, lps = list(prompt), [], []
    with torch.no_grad():
        o = model(torch.tensor([ids]), use_cache=True, output_hidden_states=True)
        cache, context, logits = o.cache, o.hidden_states[-1][0], o.logits[0, -1].float()  # [L, H], [V]
        for _ in range(MAX_NEW):
            if len(out) < min_tokens:
                logits[list(eos)] = float("-inf")
            top_p, top_ids = logits.softmax(-1).topk(k)
            cache.batch_repeat_interleave(k)
            o = model(top_ids.view(k, 1), cache=cache, use_cache=True, output_hidden_states=True)
            h = o.hidden_states[-1][:, -1]  # [k, H]
            cos = (h / h.norm(dim=-1, keepdim=True)) @ (context / context.norm(dim=-1, keepdim=True)).T
            best = int(((1 - alpha) * top_p - alpha * cos.max(dim=-1).values).argmax())
            token = int(top_ids[best])
            lps.append(float(logits.log_softmax(-1)[token]))
            out.append(token)
            ids.append(token)
            if token in eos and len(out) >= min_tokens:
                break
            cache = o.cache
            cache.batch_select_indices(torch.tensor([best]))
            context, logits = torch.cat([context, h[best:best + 1]]), o.logits[best, -1].float()
    return out, lps


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir))


@pytest.fixture(scope="module")
def prompts(reference_prompts, smollm2_tokenizer):
    hello = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                                  add_generation_prompt=True, tokenize=True)
    hello = list(hello["input_ids"] if not isinstance(hello, list) else hello)
    return [hello if c[0] == "hello" else reference_prompts[c[0]] for c in CASES]


@pytest.fixture(scope="module")
def refs(hf_smollm2, llm, prompts):
    eos = llm.engine.eos_token_ids
    return [reference(hf_smollm2, p, c[1], c[2], eos, c[3].get("min_tokens", 0)) for p, c in zip(prompts, CASES)]


def test_contrastive_search_in_one_batch_matches_the_reference(llm, prompts, refs):
    outs = llm.generate(prompts, [_params(c) for c in CASES])
    _assert_same([o.outputs[0].token_ids for o in outs], [r[0] for r in refs])
    i = next(j for j, c in enumerate(CASES) if "logprobs" in c[3])
    assert [lp.logprob for lp in outs[i].outputs[0].logprobs] == pytest.approx(refs[i][1], abs=1e-4)
    eos = llm.engine.eos_token_ids
    assert [o.outputs[0].finish_reason for o in outs] == ["stop" if r[0][-1] in eos else "length" for r in refs]
    assert [o.outputs[0].finish_reason for o in outs[-2:]] == ["stop", "length"]  # min_tokens held EOS back
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks
    llm.generate([[1]], GREEDY)  # the runner drops a finished sequence's state at the next step
    assert not llm.engine.runner.hidden_states.states  # every sequence's hidden states were freed


def test_contrastive_among_greedy_requests_staggered_and_preempted(smollm2_dir, reference_prompts, prompts,
                                                                   hf_reference, refs):
    # 12 blocks of 16 tokens and a 48-token budget: prompts are chunked, sequences preempted and
    # recomputed (their hidden states too), and some steps cannot hold a sequence's candidates.
    # Three of the cases (with logprobs, on a 64-token prompt, with min_tokens): all six took 45 s
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=12, max_num_batched_tokens=48))
    cases = [2, 3, 5]
    work = [x for i in cases for x in ((reference_prompts[i], GREEDY), (prompts[i], _params(CASES[i])))]
    done, _ = _run_staggered(engine, work, every=1)
    assert engine.scheduler.num_preemptions > 0
    _assert_same([done[str(2 * j)].outputs[0].token_ids for j in range(len(cases))], [hf_reference[i] for i in cases])
    _assert_same([done[str(2 * j + 1)].outputs[0].token_ids for j in range(len(cases))], [refs[i][0] for i in cases])


@pytest.mark.parametrize("fields, name", [
    ({"penalty_alpha": 0.6, "top_k": 4}, "temperature"),
    ({"penalty_alpha": 0.6, "temperature": 0.0}, "top_k"),
    ({"penalty_alpha": 0.6, "temperature": 0.0, "top_k": 64}, "top_k"),
    ({"penalty_alpha": 1.5}, "penalty_alpha"),
    ({"penalty_alpha": 0.6, "temperature": 0.0, "top_k": 4, "repetition_penalty": 1.1}, "repetition_penalty"),
])
def test_contrastive_fields_are_checked(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        SamplingParams(**fields)
