"""Speculative decoding with draft_model. "self": the target's first layers draft, in the step
that checks them, writing those layers' KV where the check writes it again. A model of its own
(a path): its pool is indexed by the target's block tables and kept up by running each step's
tokens too. Greedy output equals transformers' in a batch and under preemption; seeded sampling
equals itself without it; the drafts are the draft model's own greedy picks."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig, SpeculativeConfig
from engine.frontend.llm_engine import LLMEngine
from engine.runner.model_spec import kv_bytes_per_block
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered, _tokens
from tests.engine.test_models import TINY, make_tiny

SELF = {"method": "draft_model", "model": "self", "num_layers": 20, "num_speculative_tokens": 3,
        "disable_by_batch_size": None}


def test_config_needs_self_and_layers(smollm2_dir):
    for bad, field in [({"model": "other/model", "num_layers": 2}, "model"), ({"model": "self"}, "num_layers")]:
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse({"method": "draft_model", **bad})
    with pytest.raises(ValueError, match="num_layers: must be below the model's 30 layers"):
        LLMEngine(EngineConfig(model=str(smollm2_dir), speculative_config=SpeculativeConfig(
            **{**SELF, "num_layers": 30})))


@pytest.fixture(scope="module")
def self_llm(smollm2_dir):
    return LLM(str(smollm2_dir), speculative_config=SELF)


def test_greedy_in_one_batch_matches_hf(self_llm, reference_prompts, hf_reference):
    m = self_llm.engine.metrics
    before = m.accepted_tokens._value.get(), m.draft_tokens._value.get()
    _assert_same(_tokens(self_llm.generate(reference_prompts, GREEDY)), hf_reference)
    accepted, drafted = m.accepted_tokens._value.get() - before[0], m.draft_tokens._value.get() - before[1]
    assert 0 < accepted < drafted  # drafts kept and rejected: the equality is not vacuous
    assert self_llm.engine.kv.pool.num_free == self_llm.engine.num_kv_blocks


def test_the_drafts_are_the_early_exits_greedy_picks(smollm2_dir, self_llm, hf_smollm2, smollm2_tokenizer):
    """What the runner drafted, against transformers' hidden state after layer 20 through the
    final norm and head, token by token from the same context."""
    engine = self_llm.engine
    drafted = []
    fill = engine.runner._model_draft

    def recorded(seqs):
        fill(seqs)
        drafted.extend((list(s.request.token_ids), list(s.request.draft_token_ids)) for s in seqs)

    engine.runner._model_draft = recorded
    try:
        self_llm.generate(smollm2_tokenizer.encode("The capital of France is"), SamplingParams(temperature=0,
                                                                                             max_tokens=8))
    finally:
        engine.runner._model_draft = fill
    assert drafted
    for context, drafts in drafted[:3]:
        ids = list(context)
        for tok in drafts:
            with torch.no_grad():
                out = hf_smollm2(torch.tensor([ids]), output_hidden_states=True)
            h = hf_smollm2.model.norm(out.hidden_states[SELF["num_layers"]][0, -1])
            assert int(hf_smollm2.lm_head(h).argmax()) == tok
            ids.append(tok)


def test_staggered_and_preempted_match_hf(smollm2_dir, reference_prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=160, max_num_batched_tokens=128,
                                    block_size=4, speculative_config=SpeculativeConfig(**SELF)))
    prompts, want = reference_prompts[::2], hf_reference[::2]
    done = _run_staggered(engine, prompts, GREEDY, every=1)
    assert engine.scheduler.num_preemptions > 0 and engine.metrics.accepted_tokens._value.get() > 0
    _assert_same([done[str(i)][0] for i in range(len(prompts))], want)


def test_seeded_sampling_is_the_same_with_and_without(smollm2_dir, self_llm, reference_prompts):
    plain = LLM(str(smollm2_dir))
    prompts = reference_prompts[1::3]
    params = [SamplingParams(temperature=0.8, seed=11 + i, max_tokens=24) for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in self_llm.generate(prompts, params)] == want


def _draft_of_its_own(path, **over) -> dict:
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3,
            "disable_by_batch_size": None, **over}


def test_a_draft_model_needs_the_targets_tokenizer(tmp_path, smollm2_dir, smollm2_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**TINY, "vocab_size": 16})).save_pretrained(
        tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not have the target's tokenizer"):
        LLM(str(smollm2_dir), speculative_config=_draft_of_its_own(tmp_path))
    with pytest.raises(ValueError, match="num_layers"):
        SpeculativeConfig.parse(_draft_of_its_own(tmp_path, num_layers=2))


def test_the_target_as_its_own_draft_model_is_kept_nearly_always(smollm2_dir, reference_prompts, hf_reference):
    """The same weights in a pool of their own: the draft's cache must follow the target's every
    step (prefills, kept drafts, preemption) for its picks to be the target's."""
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=120, max_num_batched_tokens=128,
                                    block_size=4, speculative_config=SpeculativeConfig.parse(
                                        _draft_of_its_own(smollm2_dir))))
    prompts, want = reference_prompts[1::2], hf_reference[1::2]
    done = _run_staggered(engine, prompts, GREEDY, every=1)
    _assert_same([done[str(i)][0] for i in range(len(prompts))], want)
    m = engine.metrics
    assert engine.scheduler.num_preemptions > 0
    assert m.accepted_tokens._value.get() > 0.9 * m.draft_tokens._value.get() > 0


def test_a_random_draft_model_is_rejected_and_rolled_back(tmp_path, smollm2_dir, smollm2_tokenizer,
                                                          reference_prompts, hf_reference):
    tiny = make_tiny(tmp_path, smollm2_tokenizer, "llama", {})  # random weights, the target's tokenizer
    llm = LLM(str(smollm2_dir), kv_cache_memory="64MiB", speculative_config=_draft_of_its_own(tmp_path))
    # the memory budget holds both pools, block for block
    engine = llm.engine
    per_block = sum(kv_bytes_per_block(cfg, engine.config.block_size, torch.float32)
                    for cfg in (engine.hf_config, tiny.config))
    assert engine.num_kv_blocks == (64 << 20) // per_block
    _assert_same(_tokens(llm.generate(reference_prompts[::2], GREEDY)), hf_reference[::2])
    m = llm.engine.metrics
    assert m.draft_tokens._value.get() > 0 and m.accepted_tokens._value.get() < m.draft_tokens._value.get()
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks
