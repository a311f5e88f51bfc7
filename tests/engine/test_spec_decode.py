"""Speculative decoding (n-gram proposer): drafts are checked in the step's one forward pass and
only what the target would have produced itself is kept, so greedy output equals transformers'
(one batch, staggered, preempted, n=2), seeded sampling equals itself without speculation, stops
inside an accepted run end where they would, and rejected drafts' slots and blocks are rolled back."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig, SpeculativeConfig
from engine.frontend.llm_engine import LLMEngine
from engine.frontend.metrics import StatsLog
from engine.runner.spec_decode import FIRST_PAUSE, DraftHistory, NgramProposer, can_draft, ngram_draft
from tests.conftest import MAX_NEW_TOKENS, PASSAGE
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered, _tokens

# drafting at every batch size: the tests check what the drafts do, not when they pay
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "disable_by_batch_size": None}


@pytest.mark.parametrize("tokens,k,n_max,n_min,want", [
    ([1, 2, 3, 4, 1, 2, 3], 3, 3, 1, [4, 1, 2]),
    ([5, 6, 9, 5, 6, 7, 5, 6], 2, 2, 2, [7, 5]),  # the latest earlier occurrence
    ([1, 2, 5, 3, 2, 6, 1, 2], 2, 2, 1, [5, 3]),  # the longest n first...
    ([1, 2, 5, 3, 2, 6, 1, 2], 2, 1, 1, [6, 1]),  # ...which a shorter one would not give
    ([4, 5, 4], 3, 1, 1, [5, 4]),  # cut at the end of the history
    ([1, 2, 3, 4], 3, 2, 1, []),  # no earlier occurrence
    ([7], 3, 2, 1, []),
])
def test_ngram_draft(tokens, k, n_max, n_min, want):
    assert ngram_draft(np.array(tokens), k, n_max, n_min) == want


def test_free_tail_gives_back_the_blocks_past_the_kept_tokens():
    from engine.core.kv_cache_manager import KVCacheManager

    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate_slots("a", 13)  # 4 blocks: tokens 0-12, the last 4 of them drafts
    kv.free_tail("a", 9)  # 9 tokens kept: 3 blocks
    assert len(kv.block_ids("a")) == 3 and kv.pool.num_free == 7
    kv.free_tail("a", 12)  # nothing past the blocks it holds
    assert len(kv.block_ids("a")) == 3
    kv.check_invariants()


def test_config_is_checked_and_parsed():
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2}').num_speculative_tokens == 2
    assert SpeculativeConfig.parse({"method": "lookahead", "window": 2}).window == 2
    # each method's own default batch-size limit, unless given (null: none)
    assert SpeculativeConfig.parse({"method": "ngram"}).disable_by_batch_size == 8
    assert SpeculativeConfig.parse({"method": "lookahead"}).disable_by_batch_size == 2
    assert SpeculativeConfig.parse('{"disable_by_batch_size": null}').disable_by_batch_size is None
    for bad, field in [({"method": "draft"}, "method"), ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "lookahead", "ngram": 1}, "ngram"),
                       ({"method": "lookahead", "window": 65}, "window"),
                       ({"method": "ngram", "window": 2}, "method 'ngram' does not read window"),
                       ({"prompt_lookup_min": 5}, "prompt_lookup_min"), ({"nope": 1}, "nope")]:
        with pytest.raises(ValueError, match=field):
            SpeculativeConfig.parse(bad)


@pytest.fixture(scope="module")
def spec_llm(smollm2_dir):
    return LLM(str(smollm2_dir), speculative_config=NGRAM)


def _accepted(engine: LLMEngine) -> tuple[float, float]:
    m = engine.metrics
    return m.draft_tokens._value.get(), m.accepted_tokens._value.get()


def test_greedy_in_one_batch_matches_hf_and_drafts_are_accepted(spec_llm, reference_prompts, hf_reference):
    before = _accepted(spec_llm.engine)
    _assert_same(_tokens(spec_llm.generate(reference_prompts, GREEDY)), hf_reference)
    drafted, accepted = (a - b for a, b in zip(_accepted(spec_llm.engine), before))
    assert drafted > 0 and accepted > 0  # the equality above is not vacuous
    spec_llm.engine.check_invariants()
    assert spec_llm.engine.kv.pool.num_free == spec_llm.engine.num_kv_blocks


def test_staggered_and_preempted_match_hf(smollm2_dir, reference_prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=28, max_num_batched_tokens=128,
                                    speculative_config=SpeculativeConfig(**NGRAM)))
    prompts, want = reference_prompts[::2], hf_reference[::2]  # (every other: the suite's time)
    done = _run_staggered(engine, prompts, GREEDY, every=1)
    assert engine.scheduler.num_preemptions > 0 and _accepted(engine)[1] > 0
    _assert_same([done[str(i)][0] for i in range(len(prompts))], want)


def test_n2_matches_hf(smollm2_dir, reference_prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), speculative_config=SpeculativeConfig(**NGRAM)))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, n=2)
    done = _run_staggered(engine, reference_prompts[:6], params, every=2)
    for i, want in enumerate(hf_reference[:6]):
        assert done[str(i)] == [want, want], f"prompt {i}"


class _RandomDrafts(NgramProposer):
    """Drafts of random tokens, nearly all rejected, with now and then the right one first."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(SpeculativeConfig(**NGRAM), engine.max_model_len)
        self.rng = random.Random(0)
        self.vocab = engine.hf_config.vocab_size

    def propose(self, running) -> None:
        for req in running:
            if can_draft(req):
                k = min(self.rng.randint(1, 4), req.max_tokens - req.num_output_tokens - 1)
                req.draft_token_ids = [self.rng.randrange(self.vocab) for _ in range(max(k, 0))]


def test_rejected_drafts_roll_back_through_preemption(smollm2_dir, reference_prompts, hf_reference):
    # blocks of 4 tokens: a draft often crosses a block boundary and gets a block it gives back;
    # 160 of them cannot hold every request at once
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=160, max_num_batched_tokens=128,
                                    block_size=4, speculative_config=SpeculativeConfig(**NGRAM)))
    engine.proposer = _RandomDrafts(engine)
    given_back = []
    free_tail = engine.kv.free_tail

    def counted(seq_id, num_tokens):
        before = len(engine.kv.block_ids(seq_id))
        free_tail(seq_id, num_tokens)
        given_back.append(before - len(engine.kv.block_ids(seq_id)))

    engine.kv.free_tail = counted
    prompts, want = reference_prompts[1::2], hf_reference[1::2]
    done = _run_staggered(engine, prompts, GREEDY, every=1)  # check_invariants every step
    drafted, accepted = _accepted(engine)
    assert drafted > 0 and accepted < drafted and engine.scheduler.num_preemptions > 0
    assert sum(given_back) > 0  # blocks that held only rejected drafts went back to the pool
    _assert_same([done[str(i)][0] for i in range(len(prompts))], want)


def test_seeded_sampling_is_the_same_with_and_without_speculation(smollm2_dir, spec_llm, reference_prompts):
    plain = LLM(str(smollm2_dir))
    reference_prompts = reference_prompts[::2]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=32, n=2)
              for i in range(len(reference_prompts))]
    want = [[c.token_ids for c in o.outputs] for o in plain.generate(reference_prompts, params)]
    before = _accepted(spec_llm.engine)
    got = [[c.token_ids for c in o.outputs] for o in spec_llm.generate(reference_prompts, params)]
    assert got == want
    alone = [c.token_ids for c in spec_llm.generate(reference_prompts[3], params[3])[0].outputs]
    assert alone == want[3]
    assert _accepted(spec_llm.engine)[1] > before[1]


def test_stops_and_logprobs_inside_accepted_runs(smollm2_dir, spec_llm, smollm2_tokenizer):
    """A prompt the model copies from (so drafts are accepted), cut by max_tokens, a stop string or
    a stop token inside a run: the same tokens, text, finish and logprobs as without speculation."""
    plain = LLM(str(smollm2_dir))
    prompt = PASSAGE[:600] + " " + PASSAGE[:40]
    ids = smollm2_tokenizer.encode(prompt)
    base = plain.generate(ids, SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    stop_token = base.token_ids[17]
    cases = [SamplingParams(temperature=0, max_tokens=13, logprobs=3),
             SamplingParams(temperature=0, max_tokens=30, stop=[base.text[20:28]]),
             SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token]),
             SamplingParams(temperature=0, max_tokens=30, min_tokens=20, stop_token_ids=[stop_token])]
    # a stop token at each place of the answer: some fall inside an accepted run, with accepted
    # drafts after them that must be neither kept nor counted
    cases += [SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[t]) for t in base.token_ids[4:30]]
    for params in cases:
        want = plain.generate(ids, params)[0].outputs[0]
        counted = spec_llm.engine.metrics.generation_tokens._value.get()
        got = spec_llm.generate(ids, params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        # accepted drafts after a stop are dropped, and not counted as generated either
        assert spec_llm.engine.metrics.generation_tokens._value.get() - counted == len(got.token_ids)
        for a, b in zip(got.logprobs or [], want.logprobs or []):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_no_drafts_past_the_batch_size_limit(smollm2_dir, reference_prompts):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), speculative_config=SpeculativeConfig(
        **{**NGRAM, "disable_by_batch_size": 2})))
    seen = []  # (running sequences, draft tokens given) at each step's proposal
    propose = engine.proposer.propose

    def recorded(running):
        propose(running)
        seen.append((len(running), sum(len(r.draft_token_ids) for r in running)))

    engine.proposer.propose = recorded
    for i, p in enumerate(reference_prompts[:3]):
        engine.add_request(str(i), p, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert any(n >= 2 for n, _ in seen)
    assert all(drafts == 0 for n, drafts in seen if n >= 2)


def _pause_after_bad_drafts(h: DraftHistory) -> tuple[int, int]:
    """(bad drafts until a pause, steps the pause lasts)."""
    bad = 0
    while not h.paused:
        h.record(4, 0)
        bad += 1
    steps = 0
    while not h.may_draft():
        steps += 1
    return bad, steps


def test_a_sequence_whose_drafts_fail_pauses_longer_each_time():
    h = DraftHistory()
    assert _pause_after_bad_drafts(h) == (3, FIRST_PAUSE)  # 0.5 -> 0.375 -> 0.28 -> 0.21, below 0.25
    assert _pause_after_bad_drafts(h) == (1, 2 * FIRST_PAUSE)  # after a pause one bad draft is enough
    assert _pause_after_bad_drafts(h) == (1, 4 * FIRST_PAUSE)
    h.record(4, 4)  # a good one ends the run of pauses
    assert h.may_draft()
    assert _pause_after_bad_drafts(h)[1] == FIRST_PAUSE


def test_a_paused_sequence_gets_no_draft():
    from engine.core.request import Request

    proposer = NgramProposer(SpeculativeConfig(**NGRAM), max_model_len=100)
    req = Request("a", 0, [1, 2, 3, 4, 5, 1, 2], SamplingParams(temperature=0), max_tokens=20)
    req.num_computed_tokens = req.num_tokens - 1  # decoding
    proposer.propose([req])
    assert req.draft_token_ids == [3, 4, 5, 1]  # it would draft...
    req.draft_token_ids.clear()
    req.spec_state.paused = 2
    for _ in range(2):
        proposer.propose([req])
        assert req.draft_token_ids == []  # ...but not while paused
    proposer.propose([req])
    assert req.draft_token_ids == [3, 4, 5, 1]


def test_the_stats_lines_report_what_the_counters_hold(smollm2_dir, smollm2_tokenizer):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), speculative_config=SpeculativeConfig(**NGRAM)))
    log = StatsLog(engine.metrics, engine.scheduler, engine.kv, now=100.0, interval=10.0)
    assert log.lines(200.0) == []  # nothing ran
    ids = smollm2_tokenizer.encode(PASSAGE[:300] + " " + PASSAGE[:40])
    engine.add_request("a", ids, SamplingParams(temperature=0, max_tokens=24))
    for _ in range(3):
        engine.step()
    assert log.lines(105.0) == []  # not yet due
    engine_line, spec_line = log.lines(110.0)
    m = engine.metrics
    generated = m.generation_tokens._value.get()
    assert f"prompt {len(ids) / 10:.1f} tok/s, generation {generated / 10:.1f} tok/s, 1 running, 0 waiting" \
        in engine_line
    drafted, accepted, drafts = (c._value.get() for c in (m.draft_tokens, m.accepted_tokens, m.drafts))
    assert drafts > 0
    assert f"{accepted:.0f} of {drafted:.0f} draft tokens accepted ({100 * accepted / drafted:.1f}%) in " \
           f"{drafts:.0f} drafts, mean accepted length {1 + accepted / drafts:.2f}" in spec_line
    while engine.has_unfinished_requests():
        engine.step()
    later = log.lines(120.0)  # only what happened since the last line
    assert f"prompt 0.0 tok/s, generation {(m.generation_tokens._value.get() - generated) / 10:.1f} tok/s, " \
           "0 running" in later[0]
    assert log.lines(130.0) == []  # idle since
