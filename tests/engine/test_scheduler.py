"""Scheduler without a model: exact batches, block ids, preemption order, no leaks."""
import pytest

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler


def make(request_id: str, prompt_len: int, max_tokens: int = 8, n: int = 1) -> list[Request]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n)
    return [Request(request_id, i, list(range(1, prompt_len + 1)), params, max_tokens) for i in range(n)]


def step(sched: Scheduler, token: int = 7):
    """One step as the engine does it: schedule, 'run', advance, append tokens, finish at max."""
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.seqs:
        req = s.request
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(token)
            if req.num_output_tokens >= req.max_tokens:
                sched.finish(req, "length")
    sched.check_invariants()
    return out


def test_prefill_then_decode_with_exact_blocks():
    sched = Scheduler(KVCacheManager(num_blocks=10, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    a, = make("a", 6)
    b, = make("b", 3)
    sched.add([a])
    sched.add([b])
    out = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 6), ("b", 3)]
    assert out.seqs[0].block_ids == [0, 1] and out.seqs[1].block_ids == [2]
    out = step(sched)  # both decode one token; b's 4th token fits block 2, a's 7th fits block 1
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 1), ("b", 1)]
    assert sched.kv.block_ids("a#0") == [0, 1] and sched.kv.block_ids("b#0") == [2]
    out = step(sched)  # b's 5th token needs a new block
    assert sched.kv.block_ids("b#0") == [2, 3]


def test_new_request_joins_between_decode_steps():
    sched = Scheduler(KVCacheManager(num_blocks=10, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make("a", 4))
    step(sched)
    sched.add(make("b", 5))
    out = step(sched)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.seqs] == [("a", 1), ("b", 5)]


def test_token_budget_chunks_a_long_prompt():
    sched = Scheduler(KVCacheManager(num_blocks=20, block_size=4), max_num_seqs=4, max_num_batched_tokens=8)
    a, = make("a", 20)
    sched.add([a])
    chunks = [step(sched).seqs[0].num_new_tokens for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert a.num_output_tokens == 1  # sampled only once the whole prompt was computed


@pytest.mark.parametrize("cap", [0, 256])
def test_prompts_arriving_mid_stream_can_be_prefilled_in_capped_chunks(cap):
    # With a cap, a step beside running decodes takes at most max(cap, decodes) prompt tokens, so
    # decoding streams never wait for a whole long prompt; without one, only the budget applies.
    def sched_with(*prompts):
        sched = Scheduler(KVCacheManager(num_blocks=256, block_size=16), max_num_seqs=8,
                          max_num_batched_tokens=4096, prefill_cap=cap)
        for rid, n in prompts:
            sched.add(make(rid, n, max_tokens=50))
        return sched

    sched = sched_with(("a", 4), ("b", 4), ("e", 4))
    step(sched)
    sched.add(make("c", 600))
    sched.add(make("d", 10))
    steps = [[(s.request.request_id, s.num_new_tokens) for s in step(sched).seqs] for _ in range(3)]
    decodes = [("a", 1), ("b", 1), ("e", 1)]
    if cap:
        assert steps[0] == decodes + [("c", 256)]
        assert steps[1] == decodes + [("c", 256)]
        assert steps[2] == decodes + [("c", 88), ("d", 10)]
    else:
        assert steps[0] == decodes + [("c", 600), ("d", 10)]
    alone = sched_with(("c", 600))
    assert [s.num_new_tokens for s in step(alone).seqs] == [600]  # no decodes: the full budget


def test_capped_prefill_still_admits_a_burst_at_once():
    # More sequences waiting to start than decoding: the cap does not hold them back, since one
    # long step for the few running streams starts all the new ones.
    sched = Scheduler(KVCacheManager(num_blocks=256, block_size=16), max_num_seqs=8,
                      max_num_batched_tokens=4096, prefill_cap=16)
    sched.add(make("a", 4, max_tokens=50))
    step(sched)
    for rid in "bc":
        sched.add(make(rid, 300))
    assert [(s.request.request_id, s.num_new_tokens) for s in step(sched).seqs] == [("a", 1), ("b", 300), ("c", 300)]
    other_prompt = [5] * 300  # not a prefix-cache hit on b's blocks
    sched.add([Request("d", 0, other_prompt, SamplingParams(temperature=0.0, max_tokens=8), 8)])
    # now 3 decode and 1 waits: capped at max(16, 3)
    assert [(s.request.request_id, s.num_new_tokens) for s in step(sched).seqs][-1] == ("d", 16)


def test_max_num_seqs_limits_admission():
    sched = Scheduler(KVCacheManager(num_blocks=20, block_size=4), max_num_seqs=2, max_num_batched_tokens=64)
    for rid in "abc":
        sched.add(make(rid, 2))
    out = step(sched)
    assert [s.request.request_id for s in out.seqs] == ["a", "b"]
    assert sched.num_waiting == 1


def test_preempts_most_recent_and_resumes_where_it_was():
    # 4 blocks of 2 tokens; two requests of 3 prompt tokens each need 2 blocks, then grow.
    sched = Scheduler(KVCacheManager(num_blocks=4, block_size=2), max_num_seqs=4, max_num_batched_tokens=64)
    a, = make("a", 3, max_tokens=4)
    b, = make("b", 3, max_tokens=4)
    sched.add([a])
    sched.add([b])
    step(sched)  # a: blocks 0,1; b: blocks 2,3; each has 4 tokens now
    out = step(sched)  # the 4th tokens still fit the second blocks
    assert not out.preempted
    out = step(sched)  # a's 5th token needs a block: b (most recent) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert [s.request.request_id for s in out.seqs] == ["a"]
    assert b.num_computed_tokens == 0 and b.num_output_tokens == 2
    assert sched.kv.block_ids("a#0") == [0, 1, 3]
    while sched.has_unfinished():
        out = step(sched)
    assert a.finish_reason == b.finish_reason == "length"
    assert b.output_token_ids == [7, 7, 7, 7] and b.num_preemptions == 1
    assert sched.kv.pool.num_free == 4


def test_abort_is_idempotent_and_frees_everything():
    sched = Scheduler(KVCacheManager(num_blocks=8, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make("a", 9, max_tokens=100))
    sched.add(make("b", 4, max_tokens=100))
    step(sched)
    aborted = sched.abort("a")
    assert [r.finish_reason for r in aborted] == ["abort"]
    assert sched.abort("a") == [] and sched.abort("nope") == []
    sched.check_invariants()
    assert sched.kv.block_ids("a#0") == []
    out = sched.schedule()
    assert out.finished_seq_ids == ["a#0"]
    sched.abort("b")
    assert sched.kv.pool.num_free == 8 and not sched.has_unfinished()


def test_n2_forks_share_full_prompt_blocks():
    sched = Scheduler(KVCacheManager(num_blocks=10, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    first, second = make("a", 10, max_tokens=2, n=2)
    sched.add([first, second])
    out = step(sched)
    assert [s.request.seq_id for s in out.seqs] == ["a#0"]
    assert sched.kv.block_ids("a#1") == [0, 1]  # the two full blocks before the last prompt token
    assert sched.kv.pool.ref_counts[:3] == [2, 2, 1]
    out = step(sched)  # a#0 decodes; a#1 computes the last 2 prompt tokens in its own block
    assert [(s.request.seq_id, s.num_new_tokens) for s in out.seqs] == [("a#0", 1), ("a#1", 2)]
    assert sched.kv.block_ids("a#1") == [0, 1, 3]
    while sched.has_unfinished():
        step(sched)
    assert sched.kv.pool.num_free == 10


def test_abort_before_fork_drops_pending_children():
    sched = Scheduler(KVCacheManager(num_blocks=10, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    sched.add(make("a", 10, n=3))
    assert sched.num_waiting == 3
    assert len(sched.abort("a")) == 3
    assert not sched.has_unfinished() and sched.num_waiting == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_never_leaks(seed):
    import random

    rng = random.Random(seed)
    sched = Scheduler(KVCacheManager(num_blocks=24, block_size=4), max_num_seqs=6, max_num_batched_tokens=32)
    added = 0
    for _ in range(400):
        if added < 30 and rng.random() < 0.3:
            sched.add(make(f"r{added}", rng.randint(1, 30), max_tokens=rng.randint(1, 20), n=rng.choice([1, 1, 2])))
            added += 1
        if rng.random() < 0.05 and added:
            sched.abort(f"r{rng.randrange(added)}")
        step(sched, token=rng.randint(0, 50))
    while sched.has_unfinished():
        step(sched)
    assert sched.kv.pool.num_free == 24
    assert sched.kv.block_tables == {} or all(not t for t in sched.kv.block_tables.values())


def test_a_longrope_recompute_does_not_hold_back_the_queue():
    # longrope from 6 tokens: "a" (5 tokens) crosses it by its first output and is recomputed; that
    # is no shortage of blocks, so "b" waiting behind it is admitted in the same step
    sched = Scheduler(KVCacheManager(num_blocks=10, block_size=4), max_num_seqs=4, max_num_batched_tokens=64,
                      long_rope_from=5)
    a, = make("a", 5)
    sched.add([a])
    step(sched)
    b, = make("b", 3)
    sched.add([b])
    out = step(sched)
    assert out.preempted == [a]
    assert sorted(s.request.request_id for s in out.seqs) == ["a", "b"]  # a from the start, b admitted
    assert not out.short_of_blocks


def _ranked(request_id: str, prompt_len: int, priority: int, max_tokens: int = 8) -> Request:
    req, = make(request_id, prompt_len, max_tokens)
    req.priority = priority
    return req


def test_priority_orders_the_queue_and_fcfs_keeps_arrival():
    for policy, want in (("priority", ["c", "a", "b"]), ("fcfs", ["a", "b", "c"])):
        sched = Scheduler(KVCacheManager(num_blocks=20, block_size=4), max_num_seqs=1, max_num_batched_tokens=64,
                          policy=policy)
        for rid, rank in (("a", 1), ("b", 1), ("c", 0)):
            sched.add([_ranked(rid, 3, rank, max_tokens=1)])
        order = []
        while sched.has_unfinished():
            order += [s.request.request_id for s in step(sched).seqs]
        assert order == want, policy


def test_a_higher_priority_arrival_takes_the_seat_of_the_lowest_running():
    sched = Scheduler(KVCacheManager(num_blocks=20, block_size=4), max_num_seqs=2, max_num_batched_tokens=64,
                      policy="priority")
    sched.add([_ranked("low1", 3, 5, max_tokens=50)])
    sched.add([_ranked("low2", 3, 3, max_tokens=50)])
    step(sched)
    sched.add([_ranked("high", 3, 0, max_tokens=2)])
    out = step(sched)
    assert [r.request_id for r in out.preempted] == ["low1"]  # the lowest-ranked of the two
    assert {s.request.request_id for s in out.seqs} == {"low2", "high"}
    while sched.seqs_by_request.get("high"):
        step(sched)
    out = step(sched)  # high is done: low1 is back
    assert "low1" in {s.request.request_id for s in out.seqs}


def test_under_priority_the_pool_running_short_preempts_the_lowest_ranked():
    # 4 blocks of 4: two sequences of 8 tokens fill it; the next token of either needs a fifth
    sched = Scheduler(KVCacheManager(num_blocks=4, block_size=4), max_num_seqs=4, max_num_batched_tokens=64,
                      policy="priority")
    # (under fcfs the last admitted, "late-high", would go)
    sched.add([_ranked("early-low", 8, 9, max_tokens=20)])
    sched.add([_ranked("late-high", 8, 0, max_tokens=20)])
    victims = []
    for _ in range(3):
        victims += [r.request_id for r in step(sched).preempted]
    assert victims and set(victims) == {"early-low"}
