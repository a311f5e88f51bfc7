"""One request's fault fails that request alone: the others get the tokens of a clean run, the
blocks come back, and the engine goes on serving. The faults are injected by test doubles that
wrap the real model and sampler (the engine itself is the real one)."""
import asyncio

import pytest
import torch

from engine import LLM, AsyncLLM, EngineDeadError, RequestFailedError, SamplingParams
from engine.frontend.llm_engine import DeviceFaultError, LLMEngine
from tests.engine.test_models import make_tiny

POISON = 4242  # a token id; the model double raises when it is in a step's input
CLEAN = [[5, 17, 300, 4000, 22], list(range(100, 160)), [9, 8, 7], list(range(2000, 2037))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=2**64 - 1, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny(path, smollm2_tokenizer, "llama", {})
    return path


def _llm(tiny_dir, **options) -> LLM:
    return LLM(str(tiny_dir), num_kv_blocks=64, block_size=8, **options)


def _poison_model(engine: LLMEngine) -> list[int]:
    """Make the model raise on any step whose input holds POISON; returns the list of failed step sizes."""
    model, failed = engine.runner.model, []
    forward = model.forward

    def poisoned(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            failed.append(len(input_ids))
            raise RuntimeError("poisoned input")
        return forward(input_ids, *args, **kwargs)

    model.forward = poisoned
    return failed


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _assert_pool_empty(engine: LLMEngine) -> None:
    engine.check_invariants()
    assert engine.kv.pool.num_free == engine.num_kv_blocks and not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def clean_tokens(tiny_dir):
    llm = _llm(tiny_dir)
    return _tokens(llm.generate(CLEAN, [GREEDY, SEEDED, GREEDY, SEEDED]))


def test_a_poisoned_prompt_fails_alone_in_one_batch(tiny_dir, clean_tokens):
    llm = _llm(tiny_dir)
    failed = _poison_model(llm.engine)
    prompts = CLEAN[:2] + [[1, 2, POISON, 3]] + CLEAN[2:]
    outs = llm.generate(prompts, [GREEDY, SEEDED, GREEDY, GREEDY, SEEDED])
    bad = outs.pop(2)
    assert failed and failed[0] > 4  # the whole batch's step failed first, then the request alone
    assert bad.finished and bad.outputs[0].finish_reason == "error" and "poisoned input" in bad.error
    assert all(o.error is None for o in outs)
    assert _tokens(outs) == clean_tokens
    _assert_pool_empty(llm.engine)
    assert _tokens(llm.generate(CLEAN[:1], GREEDY)) == clean_tokens[:1]  # serving goes on


def test_a_request_that_fails_mid_stream_fails_alone(tiny_dir, clean_tokens):
    """The poisoned request joins while the others decode: its prefill shares their decode steps."""
    engine = _llm(tiny_dir).engine
    _poison_model(engine)
    params = [GREEDY, SEEDED, GREEDY, SEEDED]
    for i, (p, sp) in enumerate(zip(CLEAN, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    for step in range(200):
        if step == 3:
            engine.add_request("bad", [POISON] * 20, GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert done["bad"].outputs[0].finish_reason == "error"
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(4)] == clean_tokens
    _assert_pool_empty(engine)


def test_a_failed_sampling_step_puts_seeded_generators_back(tiny_dir, clean_tokens):
    """The sampler double draws (advancing every seeded generator) and then raises when the poisoned
    request is in the batch; the retried rows must draw what a clean run draws."""
    llm = _llm(tiny_dir)
    sampler = llm.engine.runner.sampler
    real = sampler.__class__.__call__

    class FailingAfterDrawing(sampler.__class__):
        def __call__(self, logits, md):
            result = real(self, logits, md)
            if 7 in md.num_logprobs:  # the poisoned request asks for 7 logprobs
                raise RuntimeError("sampling failed late")
            return result

    sampler.__class__ = FailingAfterDrawing
    bad = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=7)
    outs = llm.generate(CLEAN + [[3, 4, 5]], [GREEDY, SEEDED, GREEDY, SEEDED, bad])
    assert outs.pop().outputs[0].finish_reason == "error"
    assert _tokens(outs) == clean_tokens
    _assert_pool_empty(llm.engine)


def test_a_fault_after_the_model_ran_fails_that_request_alone(tiny_dir, clean_tokens):
    """The detokenizer of the second choice of an n=2 request raises: the request ends, the others
    finish as in a clean run."""
    engine = _llm(tiny_dir).engine
    for i, (p, sp) in enumerate(zip(CLEAN, [GREEDY, SEEDED, GREEDY, SEEDED])):
        engine.add_request(f"r{i}", p, sp)
    engine.add_request("bad", [3, 4, 5], SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True))

    def broken(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    engine._requests["bad"].texts[1].append = broken
    done = {}
    while engine.has_unfinished_requests():
        done.update({out.request_id: out for out in engine.step() if out.finished})
    assert done["bad"].error.startswith("UnicodeDecodeError")
    assert [c.finish_reason for c in done["bad"].outputs] == ["error", "error"]
    assert [done[f"r{i}"].outputs[0].token_ids for i in range(4)] == clean_tokens
    _assert_pool_empty(engine)


def test_a_device_fault_ends_the_engine(tiny_dir):
    engine = _llm(tiny_dir).engine
    forward = engine.runner.model.forward

    def lost(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    engine.runner.model.forward = lost
    engine.add_request("a", [1, 2, 3], GREEDY)
    with pytest.raises(DeviceFaultError, match="illegal memory access"):
        engine.step()
    engine.runner.model.forward = forward


def test_a_device_fault_while_retrying_request_by_request_ends_the_engine_once(tiny_dir):
    """The step fails for a request's own fault, then the device fails while each request is run
    alone: the engine ends with the device's error, said once."""
    engine = _llm(tiny_dir).engine
    forward, calls = engine.runner.model.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a request's own fault")
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    engine.runner.model.forward = failing
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.add_request("b", [4, 5, 6], GREEDY)
    with pytest.raises(DeviceFaultError, match="illegal memory access") as caught:
        engine.step()
    assert str(caught.value).count("the device failed") == 1, str(caught.value)
    engine.runner.model.forward = forward


def test_async_engine_fails_one_stream_and_serves_on(tiny_dir, clean_tokens):
    async def collect(llm, prompt, params, rid):
        out = None
        async for out in llm.generate(prompt, params, rid):  # noqa: B007 - the last one is returned
            pass
        return out

    async def main():
        llm = AsyncLLM.from_options(model=str(tiny_dir), num_kv_blocks=64, block_size=8)
        try:
            _poison_model(llm.engine)
            runs = [collect(llm, p, GREEDY, f"ok{i}") for i, p in enumerate(CLEAN[::2])]
            runs.insert(1, collect(llm, [POISON, 1], GREEDY, "bad"))
            results = await asyncio.gather(*runs, return_exceptions=True)
            assert isinstance(results[1], RequestFailedError) and "poisoned" in str(results[1])
            assert [r.outputs[0].token_ids for r in results[::2]] == clean_tokens[::2]
            assert llm.is_alive
            assert (await collect(llm, CLEAN[0], GREEDY, "after")).outputs[0].token_ids == clean_tokens[0]
            llm.engine.runner.model.forward = lambda *a, **k: (_ for _ in ()).throw(
                torch.AcceleratorError("CUDA error: device lost"))
            with pytest.raises(EngineDeadError):
                await collect(llm, CLEAN[0], GREEDY, "lost")
            assert not llm.is_alive
        finally:
            llm.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("fields,name", [
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(top_k=2**63), "top_k"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=1e308), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(stop=["a"] * 5), "stop"), (dict(stop="x" * 257), "stop"),
    (dict(stop_token_ids=[49152]), "stop_token_ids"), (dict(logit_bias={49152: 1.0}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"), (dict(logprobs=21), "logprobs"),
    (dict(presence_penalty=float("-inf")), "presence_penalty"), (dict(n=True), "n"),
])
def test_out_of_range_fields_are_refused_before_the_engine_runs(tiny_dir, fields, name):
    """SamplingParams refuses what it can judge alone; the engine what needs the vocabulary (49152)."""
    llm = _llm(tiny_dir)
    with pytest.raises(ValueError, match=f"^{name}:"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, **fields))
    _assert_pool_empty(llm.engine)


@pytest.mark.parametrize("seed", [-2**63, -1, 0, 2**63, 2**64 - 1])
def test_every_64_bit_seed_samples(tiny_dir, seed):
    llm = _llm(tiny_dir)
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=4, ignore_eos=True)
    first, again = (llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids for _ in range(2))
    assert len(first) == 4 and first == again
