"""Lookahead decoding: the proposer's draft tree (the window and the candidates, with the paper's
mask), what it learns from a step, and through the engine: greedy output equal to transformers'
(one batch, staggered and preempted, kept drafts moved to their slots), seeded sampling equal to
itself without speculation."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig, SpeculativeConfig
from engine.core.request import Request
from engine.frontend.llm_engine import LLMEngine
from engine.runner.batch import tree_mask
from engine.runner.lookahead import LookaheadProposer, LookaheadState
from engine.runner.runner_output import ModelRunnerOutput
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered, _tokens

LOOKAHEAD = {"method": "lookahead", "window": 3, "ngram": 3, "guess": 3, "disable_by_batch_size": None}


def _decoding(tokens: list[int], max_tokens: int = 20) -> Request:
    req = Request("a", 0, tokens, SamplingParams(temperature=0), max_tokens=max_tokens)
    req.num_computed_tokens = req.num_tokens - 1
    return req


def _proposer(**over) -> LookaheadProposer:
    return LookaheadProposer(SpeculativeConfig(**{**LOOKAHEAD, **over}), max_model_len=100)


def test_the_tree_holds_the_candidates_as_a_trie_then_the_window():
    p = _proposer(window=2)
    req = _decoding([9, 9])  # no n-gram of 3 in the prompt yet
    req.spec_state = LookaheadState(levels=[[50, 51], [60, 61]], seen=2,
                                    pool={9: [(1, 2), (1, 3), (4, 5)], 7: [(8, 8)]})
    p.propose([req])
    t = req.draft_tree
    # candidates after the last token (9): 1 -> {2, 3}, 4 -> 5; then levels 0 and 1 of the window
    assert req.draft_token_ids == [1, 2, 3, 4, 5, 50, 51, 60, 61]
    assert t.parents == [-1, 0, 0, -1, 3, None, None, None, None]
    assert t.offsets == [1, 2, 2, 1, 2, 1, 2, 2, 3]
    # a candidate sees its branch; guess (l, w) sees level 0 up to w (before w at level 0) and its column
    assert t.sees == [(), (0,), (0,), (), (3,), (), (5,), (5,), (5, 6)]
    assert t.num_candidates == 5


@pytest.mark.parametrize("window,ngram,guess", [(3, 3, 3), (4, 5, 2), (1, 2, 4)])
def test_every_draft_sees_one_token_at_each_position_before_it(window, ngram, guess):
    """The paper's mask, as a property: what a draft sees, with the last token and itself, is one
    token at each position from the last token's to its own (a sequence it continues)."""
    p = _proposer(window=window, ngram=ngram, guess=guess)
    req = _decoding([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3] * 2 + [3])
    for _ in range(ngram + 1):  # a full window: feed the guesses back as the target's picks
        p.propose([req])
        t = req.draft_tree
        for i, seen in enumerate(t.sees):
            assert sorted(t.offsets[j] for j in seen) == list(range(1, t.offsets[i]))
            assert all(j < i for j in seen)
        picks = [0] + [(tok * 7 + 1) % 10 for tok in req.draft_token_ids]
        p.record([type("S", (), {"request": req})],
                 ModelRunnerOutput(sampled={req.seq_id: picks[:2]}, tree_picks={req.seq_id: picks}))
        req.clear_drafts()
    assert len(req.spec_state.levels) == ngram - 1


def test_the_last_levels_picks_make_ngrams_and_the_next_level():
    p = _proposer(window=2)
    req = _decoding([9, 9])
    req.spec_state = LookaheadState(levels=[[50, 51], [60, 61]], seen=2)
    p.propose([req])  # no candidates: drafts are the window, 50 51 60 61
    picks = [0, 7, 7, 70, 71]  # the last token's, then at each guess
    p.record([type("S", (), {"request": req})],
             ModelRunnerOutput(sampled={req.seq_id: [7]}, tree_picks={req.seq_id: picks}))
    st = req.spec_state
    assert st.levels == [[60, 61], [70, 71]]  # the oldest level went, the picks at the last one came
    assert st.pool == {50: [(60, 70)], 51: [(61, 71)]}  # each column and its pick: an n-gram
    assert st.pool2 == {(9, 50): [(60, 70)], (50, 51): [(61, 71)]}  # after the token before it


def test_candidates_after_the_same_token_come_first():
    p = _proposer(guess=2)
    req = _decoding([7, 1, 2, 8, 1, 3, 9, 7, 1])
    p.propose([req])
    assert req.spec_state.pool[1] == [(3, 9), (2, 8)]
    assert req.draft_token_ids[:4] == [2, 8, 3, 9]  # (2, 8) came after 7, 1 as the last two tokens are


def test_a_sequence_whose_steps_keep_nothing_pauses():
    p = _proposer()
    req = _decoding([1, 2, 3, 1, 2, 4, 1])
    for _ in range(3):
        p.propose([req])
        assert req.draft_token_ids
        picks = [0] * (1 + len(req.draft_token_ids))  # the target picked none of the drafts
        p.record([type("S", (), {"request": req})],
                 ModelRunnerOutput(sampled={req.seq_id: [0]}, tree_picks={req.seq_id: picks}))
        req.clear_drafts()
    p.propose([req])
    assert req.draft_token_ids == []


def test_the_pool_holds_the_prompts_ngrams_newest_first_and_at_most_guess():
    p = _proposer(guess=2)
    req = _decoding([1, 2, 3, 1, 2, 4, 1, 5, 6, 1])
    p.propose([req])
    assert req.spec_state.pool[1] == [(5, 6), (2, 4)]  # (2, 3) is older than both
    assert req.draft_token_ids[:4] == [5, 6, 2, 4]


def test_no_candidate_past_max_tokens_and_no_window_past_the_context():
    p = _proposer()
    req = _decoding([5, 1, 2, 3, 1], max_tokens=2)  # room for one draft: the last output is the target's
    p.propose([req])
    t = req.draft_tree
    assert [o for o, par in zip(t.offsets, t.parents) if par is not None] == [1]
    q = LookaheadProposer(SpeculativeConfig(**LOOKAHEAD), max_model_len=8)
    req = _decoding([5, 1, 2, 3, 1])
    q.propose([req])
    assert all(par is not None for par in req.draft_tree.parents)  # candidates only: guesses would not fit


@pytest.fixture(scope="module")
def lookahead_llm(smollm2_dir):
    return LLM(str(smollm2_dir), speculative_config=LOOKAHEAD)


def _count_moves(engine: LLMEngine) -> list[int]:
    moves = []
    move = engine.runner._move_kept_kv

    def counted(m):
        moves.append(len(m))
        move(m)

    engine.runner._move_kept_kv = counted
    return moves


def test_greedy_in_one_batch_matches_hf(lookahead_llm, reference_prompts, hf_reference):
    moves = _count_moves(lookahead_llm.engine)
    m = lookahead_llm.engine.metrics
    before = m.accepted_tokens._value.get()
    _assert_same(_tokens(lookahead_llm.generate(reference_prompts, GREEDY)), hf_reference)
    assert m.accepted_tokens._value.get() > before  # not vacuous: candidates were kept...
    assert sum(moves) > 0  # ...some of them not the trie's first branch, so moved to their slots
    lookahead_llm.engine.check_invariants()
    assert lookahead_llm.engine.kv.pool.num_free == lookahead_llm.engine.num_kv_blocks


def test_staggered_and_preempted_match_hf(smollm2_dir, reference_prompts, hf_reference):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=160, max_num_batched_tokens=128,
                                    block_size=4, speculative_config=SpeculativeConfig(**LOOKAHEAD)))
    prompts, want = reference_prompts[1::2], hf_reference[1::2]
    done = _run_staggered(engine, prompts, GREEDY, every=1)  # check_invariants every step
    assert engine.scheduler.num_preemptions > 0 and engine.metrics.accepted_tokens._value.get() > 0
    _assert_same([done[str(i)][0] for i in range(len(prompts))], want)


def test_seeded_sampling_is_the_same_with_and_without_lookahead(smollm2_dir, lookahead_llm, reference_prompts,
                                                                 hf_smollm2):
    """The same tokens, but where a seeded draw falls within float32 noise of the edge between two
    tokens: the drafts' verification rows compute the logits in another order (their own mask and
    attention), ~3e-6 off in logprob, which on some CPUs (today's AVX-512 VM) moves that edge past
    the draw. Such a choice must agree up to that token, and the draw must lie at the edge
    (transformers' distribution says where it is); at most one choice may differ."""
    plain = LLM(str(smollm2_dir))
    prompts = reference_prompts[::3]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=7 + i, max_tokens=32, n=2) for i in range(len(prompts))]
    want = [[c.token_ids for c in o.outputs] for o in plain.generate(prompts, params)]
    got = [[c.token_ids for c in o.outputs] for o in lookahead_llm.generate(prompts, params)]
    flips = [(i, c) for i in range(len(prompts)) for c in range(2) if got[i][c] != want[i][c]]
    assert len(flips) <= 1, flips
    for i, c in flips:
        j = next(k for k, (a, b) in enumerate(zip(want[i][c], got[i][c])) if a != b)
        edge, draw = _edge_and_draw(hf_smollm2, prompts[i] + want[i][c][:j], params[i], c, j,
                                    want[i][c][j], got[i][c][j])
        assert abs(draw - edge) < 1e-5, (i, c, j, draw, edge)  # (elsewhere a draw is ~0.1 from an edge)


def _edge_and_draw(hf, ids: list[int], params: SamplingParams, choice: int, position: int, a: int, b: int):
    """Where tokens a and b meet in the sampler's cumulative distribution (token-id order, after
    temperature and top_p) at the token after `ids`, by transformers' logits; and the row's seeded
    draw. With no mass between them, the edge is the end of the lower id's interval."""
    import torch

    from engine.runner.sampler import mask_top_k_top_p_min_p, seeded_uniform

    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[:, -1] / params.temperature  # [1, V]
    probs = mask_top_k_top_p_min_p(logits, None, torch.tensor([params.top_p]), None).softmax(-1)[0]
    cdf = probs.cumsum(0, dtype=torch.float64)
    low, high = sorted((a, b))
    assert cdf[high - 1] - cdf[low] < 1e-6, "a and b are not neighbours in the distribution"
    return float(cdf[low]), seeded_uniform(params.generator_seed, choice, position)


def test_the_tree_mask_is_what_the_tree_says():
    from engine.core.request import DraftTree

    tree = DraftTree(offsets=[1, 2, 1], sees=[(), (0,), ()], parents=[-1, 0, None])
    mask = tree_mask(tree, history=2)  # [4 tokens, 2 + 4 keys]
    want = [[1, 1, 1, 0, 0, 0],   # the last token: the history and itself
            [1, 1, 1, 1, 0, 0],   # draft 0
            [1, 1, 1, 1, 1, 0],   # draft 1 sees draft 0
            [1, 1, 1, 0, 0, 1]]   # draft 2 sees neither
    assert mask.int().tolist() == want
