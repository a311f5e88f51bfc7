"""Beam search equals transformers' generate(num_beams=k) token for token, scores within 1e-4,
alone, batched with other requests, staggered and under preemption; beams share KV blocks."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.beam import BeamGroup, Candidates
from engine.core.config import EngineConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler
from engine.frontend.llm_engine import LLMEngine
from tests.engine.test_correctness import GREEDY, _assert_same

MAX_NEW = 16
# (prompt index into reference_prompts, k, n, length_penalty, early_stopping, extras): every k with
# both length penalties, every early_stopping value with both, over prompts of 1 to 220 tokens;
# the chat prompt (index 12) ends on EOS within the limit, so hypotheses finish early there
CASES = [
    (0, 2, 2, 1.0, False, {}),
    (2, 2, 1, 2.0, True, {}),
    (12, 2, 2, 1.0, "never", {}),
    (4, 4, 4, 2.0, False, {}),
    (12, 4, 2, 1.0, True, {"min_tokens": 10}),
    (7, 4, 1, 2.0, "never", {}),
    (12, 8, 3, 1.0, False, {}),
    (6, 8, 8, 2.0, True, {}),
    (9, 8, 2, 1.0, "never", {"logprobs": 2}),
    (12, 4, 4, 2.0, False, {"ignore_eos": True}),
    (5, 4, 2, 1.0, False, {"stop_token_ids": "frequent"}),
    (3, 4, 4, 1.0, False, {"stop": [" the"]}),  # a stop string (the passage has many)
]


def _params(case, frequent: int) -> SamplingParams:
    _, k, n, lp, es, extra = case
    extra = dict(extra)
    if extra.get("stop_token_ids") == "frequent":
        extra["stop_token_ids"] = [frequent]
    return SamplingParams(use_beam_search=True, temperature=0.0, best_of=k, n=n, length_penalty=lp,
                          early_stopping=es, max_tokens=MAX_NEW, **extra)


def _hf_beams(model, tokenizer, prompt, params: SamplingParams, eos: list[int]):
    """transformers' beam search: (each returned beam's tokens, up to the one that ended it, scores)."""
    stops = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos)))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                             num_beams=params.best_of, num_return_sequences=params.n,
                             length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                             min_new_tokens=params.min_tokens or None, eos_token_id=stops or None,
                             stop_strings=params.stop_strings or None, tokenizer=tokenizer,
                             pad_token_id=eos[0], return_dict_in_generate=True, output_scores=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # the tokens each beam generated
    rows = out.sequences[:, len(prompt):].tolist()
    return [row[:n] for row, n in zip(rows, lengths)], out.sequences_scores.tolist()


@pytest.fixture(scope="module")
def frequent(reference_prompts, hf_reference):
    """A token the greedy outputs use often (a stop token that beams will meet)."""
    counts = {}
    for out in hf_reference:
        for t in out:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir))


@pytest.fixture(scope="module")
def hf_beams(hf_smollm2, smollm2_tokenizer, llm, reference_prompts, frequent):
    eos = sorted(llm.engine.eos_token_ids)
    return [_hf_beams(hf_smollm2, smollm2_tokenizer, reference_prompts[c[0]], _params(c, frequent), eos)
            for c in CASES]


def _check(outputs, refs) -> None:
    for case, out, (want, scores) in zip(CASES, outputs, refs):
        got = [c.token_ids for c in out.outputs]
        assert len(got) == case[2], case
        _assert_same(got, want)
        assert [c.score for c in out.outputs] == pytest.approx(scores, abs=1e-4), case


def test_beams_in_one_batch_match_hf(llm, reference_prompts, frequent, hf_beams, hf_smollm2):
    outs = llm.generate([reference_prompts[c[0]] for c in CASES], [_params(c, frequent) for c in CASES])
    _check(outs, hf_beams)
    assert {c.finish_reason for o in outs for c in o.outputs} == {"stop", "length"}
    cut = [c for c in outs[-1].outputs if c.stop_reason == " the"]  # the stop string case
    assert cut and all(" the" not in c.text and c.finish_reason == "stop" for c in cut)
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks
    # the logprobs of a returned beam: the model's own, token by token (a forward over the whole text)
    i = next(j for j, c in enumerate(CASES) if "logprobs" in c[5])
    case, prompt = CASES[i], reference_prompts[CASES[i][0]]
    for c in outs[i].outputs:
        with torch.no_grad():
            logits = hf_smollm2(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
        want = logits.float().log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert [lp.logprob for lp in c.logprobs] == pytest.approx(want.tolist(), abs=1e-4)
        assert all(len(lp.top) == 2 and lp.rank >= 1 for lp in c.logprobs)
        penalty = len(c.token_ids) ** case[3]
        assert c.cumulative_logprob == pytest.approx(sum(want.tolist()), abs=1e-4)
        assert c.score == pytest.approx(c.cumulative_logprob / penalty, abs=1e-5)


def _run_staggered(engine: LLMEngine, work, every: int) -> tuple[dict, set[str]]:
    """Add (prompt, params) one every `every` steps while the others run; invariants each step.
    Returns the outputs by request id and the beams that were preempted."""
    pending = list(enumerate(work))
    done, preempted = {}, set()
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
        preempted |= {r.seq_id for r in engine.scheduler.waiting if r.beam is not None and r.num_preemptions}
        step += 1
    assert engine.kv.pool.num_free == engine.num_kv_blocks
    return done, preempted


def test_beams_among_greedy_and_sampled_requests_staggered_and_preempted(
        smollm2_dir, reference_prompts, hf_reference, frequent, hf_beams):
    # beam groups between greedy and seeded requests, one added per step; with 32 blocks of 16
    # tokens, sequences (beams too) are preempted and recomputed, and a budget of 64 tokens chunks
    # the prompts and splits a group's beams over steps
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=32, max_num_batched_tokens=64,
                                    max_num_seqs=24))
    sampled = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_NEW)
    greedy = [(p, GREEDY) for p in reference_prompts[:6]]
    work = [x for pair in zip(greedy, [(reference_prompts[c[0]], _params(c, frequent)) for c in CASES[:6]])
            for x in pair] + [(reference_prompts[3], sampled)]
    done, preempted = _run_staggered(engine, work, every=1)
    assert preempted
    _assert_same([done[str(2 * i)].outputs[0].token_ids for i in range(6)], hf_reference[:6])
    _check([done[str(2 * i + 1)] for i in range(6)], hf_beams[:6])
    alone = LLM(str(smollm2_dir)).generate([reference_prompts[3]], sampled)[0].outputs[0].token_ids
    assert done[str(len(work) - 1)].outputs[0].token_ids == alone


def test_beams_share_the_prompts_blocks_and_give_every_block_back(smollm2_dir, reference_prompts):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir)))
    prompt = reference_prompts[8]  # 150 tokens: 9 full blocks of 16 and a partial one
    k = 8
    engine.add_request("b", prompt, SamplingParams(use_beam_search=True, temperature=0.0, best_of=k, max_tokens=24))
    used = []
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_invariants()
        tables = [engine.kv.block_ids(f"b#{i}") for i in range(k)]
        used.append((engine.num_kv_blocks - engine.kv.pool.num_free, len({b for t in tables for b in t}),
                     sum(len(t) for t in tables)))
    # after the first step: the 9 full prompt blocks once, and each beam's copy of the partial one
    assert used[0][:2] == (9 + k, 9 + k)
    for pool_used, distinct, independent in used[:-1]:
        assert pool_used == distinct < independent  # shared blocks are counted once
    assert engine.kv.pool.num_free == engine.num_kv_blocks


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(8, 4)
    kv.allocate_slots("a", 10)  # 3 blocks: 2 full, 1 with 2 tokens
    a = kv.block_ids("a")
    computed, copies = kv.fork("a", "b", 10)
    b = kv.block_ids("b")
    assert computed == 10 and b[:2] == a[:2] and b[2] != a[2] and copies == [(a[2], b[2])]
    assert [kv.pool.ref_counts[i] for i in a] == [2, 2, 1]
    kv.check_invariants()
    kv.allocate_slots("c", 1)
    kv.allocate_slots("d", 12)  # the pool is full: a fork copies nothing and recomputes the tail
    computed, copies = kv.fork("a", "e", 10)
    assert (computed, copies, kv.block_ids("e")) == (8, [], a[:2])
    for s in "abcde":
        kv.free(s)
    kv.check_invariants()
    assert kv.pool.num_free == 8


@pytest.mark.parametrize("fields, name", [
    ({"use_beam_search": True}, "temperature"),
    ({"use_beam_search": True, "temperature": 0.0, "best_of": 2, "n": 3}, "best_of"),
    ({"use_beam_search": True, "temperature": 0.0, "best_of": 64}, "best_of"),
    ({"use_beam_search": True, "temperature": 0.0, "early_stopping": "sometimes"}, "early_stopping"),
    ({"use_beam_search": True, "temperature": 0.0, "length_penalty": float("nan")}, "length_penalty"),
    ({"use_beam_search": True, "temperature": 0.0, "top_p": 0.5}, "top_p"),
    ({"use_beam_search": True, "temperature": 0.0, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"length_penalty": 0.5}, "length_penalty"),
    ({"early_stopping": True}, "early_stopping"),
    ({"best_of": 3}, "best_of"),
])
def test_beam_fields_are_checked(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        SamplingParams(**fields)


def _parked_group(sched: Scheduler, rid: str, prompt: list[int]) -> list[Request]:
    """A forked group of two beams: beam 0 computed and reported, beam 1 preempted, waiting."""
    params = SamplingParams(use_beam_search=True, temperature=0.0, best_of=2, max_tokens=8)
    group = BeamGroup(2, 1, 1.0, False, 8, frozenset({0}))  # (width, n, length penalty, early stop, max, stops)
    slots = [Request(rid, i, prompt, params, 8, beam=group) for i in range(2)]
    sched.add(slots)
    first, second = slots
    sched.waiting.remove(first)
    first.token_ids += [5, 6]
    assert sched.kv.allocate_slots(first.seq_id, 6)
    first.num_computed_tokens = 6
    sched.kv.cache_full_blocks(first.seq_id, first.token_ids, 6, first.cache_salt)
    first.status = RequestStatus.RUNNING
    sched.running.append(first)
    group.forked = True
    group.report(0, Candidates([9], [-1.0]))
    second.token_ids += [7, 8]
    sched.waiting.append(second)
    return slots


def test_beams_waiting_on_a_preempted_sibling_make_way_when_nothing_can_run():
    # two groups fill the pool with their reported beams while each one's other beam waits for a
    # block: nothing can run; the last group's beams give theirs back and queue at the back
    sched = Scheduler(KVCacheManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    _parked_group(sched, "a", [1, 2, 3, 4])
    b0, _ = _parked_group(sched, "b", [11, 12, 13, 14])
    assert sched.kv.pool.num_free == 0
    out = sched.schedule()
    assert out.preempted == [b0] and list(sched.waiting)[-1] is b0
    scheduled = {s.request.seq_id: s.num_new_tokens for s in out.seqs}
    assert scheduled["a#1"] == 2  # its prompt's block found in the cache, its own two tokens computed
    assert sched.kv.block_ids("a#1")[0] == sched.kv.block_ids("a#0")[0]
    sched.check_invariants()


def test_an_aborted_beam_search_ends_with_its_beams_and_frees_every_block(smollm2_dir, reference_prompts):
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir)))
    engine.add_request("b", reference_prompts[5], SamplingParams(use_beam_search=True, temperature=0.0, best_of=4,
                                                                 n=2, max_tokens=32))
    for _ in range(4):
        assert engine.step() == []  # a beam search reports once, at the end
    out = engine.abort_request("b")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert all(len(c.token_ids) == 4 for c in out.outputs)  # one token at the first step, then one a step
    engine.check_invariants()
    assert engine.kv.pool.num_free == engine.num_kv_blocks and not engine.has_unfinished_requests()


def test_a_beam_group_wider_than_the_batch_is_refused(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_num_seqs=4)  # (it would wait for 8 seats forever)
    with pytest.raises(ValueError, match=r"^best_of: the beam width must be at most max_num_seqs, 4"):
        llm.generate(["hi"], SamplingParams(use_beam_search=True, temperature=0.0, best_of=8))
