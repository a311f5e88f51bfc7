"""Offline and async APIs on SmolLM2: stopping rules, errors, aborts, seeds, n > 1."""
import asyncio
import dataclasses

import pytest

from engine import LLM, AsyncLLM, ContextLengthError, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), max_model_len=1024)


@pytest.fixture(scope="module")
def chat_prompt(reference_prompts):
    return reference_prompts[-1]  # "What is the capital of France?" in the chat template


def _assert_pool_empty(llm):
    llm.engine.check_invariants()
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def test_sanity_paris_and_eos(llm, chat_prompt):
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=30)).pop().outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids[-1] in llm.engine.eos_token_ids


def test_max_tokens_ignore_eos_and_min_tokens(llm, chat_prompt):
    eos = next(iter(llm.engine.eos_token_ids))
    base = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0]
    n_eos = len(base.token_ids)
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=3))[0].outputs[0]
    assert out.finish_reason == "length" and out.token_ids == base.token_ids[:3]
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=n_eos + 5,
                                                   ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == n_eos + 5 and out.token_ids[n_eos - 1] == eos
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=n_eos + 10,
                                                   min_tokens=n_eos + 2))[0].outputs[0]
    assert eos not in out.token_ids[:n_eos + 2] and len(out.token_ids) >= n_eos + 2
    _assert_pool_empty(llm)


def test_stop_token_ids_and_stop_strings(llm, chat_prompt):
    base = llm.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0]
    tok = base.token_ids[3]
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and out.token_ids == base.token_ids[:4]
    out = llm.generate(chat_prompt, SamplingParams(temperature=0.0, stop=["ce is P"]))[0].outputs[0]
    assert out.text == "The capital of Fran" and out.stop_reason == "ce is P"


def test_context_and_pool_limits_are_rejected_up_front(smollm2_dir, llm):
    with pytest.raises(ContextLengthError, match="maximum context length is 1024 tokens"):
        llm.generate([[1] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 10 ** 9]])
    small = LLM(str(smollm2_dir), num_kv_blocks=4, block_size=16)
    with pytest.raises(ContextLengthError, match="KV-cache blocks"):
        small.generate([[1] * 60], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    _assert_pool_empty(llm)


def test_abort_mid_run_frees_blocks(llm, reference_prompts):
    engine = llm.engine
    engine.add_request("keep", reference_prompts[6], SamplingParams(temperature=0.0, max_tokens=20))
    engine.add_request("drop", reference_prompts[9], SamplingParams(temperature=0.0, max_tokens=200, n=2))
    for _ in range(3):
        engine.step()
    used = engine.num_kv_blocks - engine.kv.pool.num_free
    out = engine.abort_request("drop")
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort", "abort"]
    assert engine.abort_request("drop") is None
    assert engine.num_kv_blocks - engine.kv.pool.num_free < used
    while engine.has_unfinished_requests():
        engine.step()
    _assert_pool_empty(llm)


def test_seeded_sampling_is_batch_invariant_and_n_choices_differ(llm, reference_prompts):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=42, ignore_eos=True)
    alone = llm.generate(reference_prompts[7], params)[0].outputs[0].token_ids
    batch = llm.generate(reference_prompts[3:10], [SamplingParams(temperature=1.0, max_tokens=20)] * 4
                         + [params] + [SamplingParams(temperature=0.5, seed=1, max_tokens=8)] * 2)
    assert batch[4].outputs[0].token_ids == alone
    again = llm.generate(reference_prompts[7], params)[0].outputs[0].token_ids
    assert again == alone
    three = llm.generate(reference_prompts[7], SamplingParams(temperature=1.0, max_tokens=16, seed=3, n=3))[0]
    assert [c.index for c in three.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in three.outputs}) == 3
    _assert_pool_empty(llm)


def test_async_engine_streams_and_aborts(smollm2_dir, reference_prompts):
    engine = AsyncLLM(EngineConfig(model=str(smollm2_dir)))
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    async def collect(prompt):
        last = None
        async for out in engine.generate(prompt, greedy):
            assert last is None or len(out.outputs[0].token_ids) >= len(last.outputs[0].token_ids)
            last = out
        return last

    async def abandon(prompt):
        async for out in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=500)):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the client goes away: the request must be aborted

    async def main():
        results = await asyncio.gather(*(collect(p) for p in reference_prompts[4:8]), abandon(reference_prompts[9]))
        with pytest.raises(ContextLengthError):
            async for _ in engine.generate([1] * 9000, greedy):
                pass
        return results[:4]

    try:
        results = asyncio.run(main())
        offline = LLM(str(smollm2_dir)).generate(reference_prompts[4:8], greedy)
        assert [r.outputs[0].token_ids for r in results] == [o.outputs[0].token_ids for o in offline]
        assert all(r.finished for r in results)
        for _ in range(100):  # the abort is applied by the worker before its next step
            if not engine.engine.has_unfinished_requests():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.engine.has_unfinished_requests()
        assert engine.engine.kv.pool.num_free == engine.engine.num_kv_blocks
        assert engine.is_alive
    finally:
        engine.shutdown()


def _outputs_by_kind(engine, prompt, params, kind: str) -> list:
    engine.add_request(kind, prompt, dataclasses.replace(params, output_kind=kind))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == kind]
    return outs


@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=40, logprobs=2, prompt_logprobs=1, stop=[" the", "."]),
    SamplingParams(temperature=0.0, max_tokens=30, logprobs=0),
])
def test_deltas_add_up_to_the_cumulative_output(llm, chat_prompt, params):
    """Each delta holds only what is new; joined they are the cumulative output's last state, and
    "final" hands back that one output alone."""
    cumulative = _outputs_by_kind(llm.engine, chat_prompt, params, "cumulative")
    deltas = _outputs_by_kind(llm.engine, chat_prompt, params, "delta")
    final = _outputs_by_kind(llm.engine, chat_prompt, params, "final")
    assert len(final) == 1 and final[0].finished and len(deltas) == len(cumulative) > 1
    last = cumulative[-1]
    assert [(c.text, c.token_ids, c.finish_reason) for c in final[0].outputs] == \
        [(c.text, c.token_ids, c.finish_reason) for c in last.outputs]
    for i, whole in enumerate(last.outputs):
        parts = [d.outputs[i] for d in deltas]
        assert "".join(p.text for p in parts) == whole.text
        assert [t for p in parts for t in p.token_ids] == whole.token_ids
        assert [lp for p in parts for lp in p.logprobs] == whole.logprobs
        assert parts[-1].cumulative_logprob == pytest.approx(whole.cumulative_logprob, abs=1e-6)
        assert parts[-1].finish_reason == whole.finish_reason and parts[-1].stop_reason == whole.stop_reason
    # running text is shown as it becomes safe: each delta's text is what the cumulative one added
    for d, c, before in zip(deltas, cumulative, [None] + cumulative[:-1]):
        for i in range(len(c.outputs)):
            assert d.outputs[i].text == c.outputs[i].text[len(before.outputs[i].text) if before else 0:]
    assert deltas[0].prompt_logprobs == last.prompt_logprobs and all(d.prompt_logprobs is None for d in deltas[1:])
    _assert_pool_empty(llm)
