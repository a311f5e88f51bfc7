"""Tensor parallelism on CPU: 2 ranks over gloo (one process each) give transformers' greedy tokens,
logprobs within 1e-4, in one batch and staggered under preemption, on the fast CPU paths and the
reference ones; for a model whose KV heads split over the ranks and one with fewer KV heads than
ranks (replicated); for the MoE and Gemma families; with a draft model; the bundled model over 3
ranks on its GGUF blocks. A rank that dies or hangs ends the engine cleanly; ranks wait out any
idle time. Shapes that do not split are refused by name."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import DeviceFaultError, LLMEngine
from tests.conftest import MAX_NEW_TOKENS, hf_greedy
from tests.engine.test_correctness import _assert_same, _run_staggered
from tests.engine.test_model_families import FAMILIES, MOE, REFERENCE_PATH, _hf_log_softmax, in_float64
from tests.engine.test_models import make_tiny

MAX_NEW = 12
PROMPTS = [[5, 17, 300, 4000, 22], list(range(100, 160)), [9], list(range(2000, 2130, 3))]
# 4 query heads; KV heads 2 (one a rank) or 1 (on both ranks); biases on every projection
SHAPES = {"kv-split": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
          "kv-replicated": dict(num_key_value_heads=1, tie_word_embeddings=False)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tiny(request, tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(path, smollm2_tokenizer, "llama", SHAPES[request.param])
    torch.manual_seed(1)
    for name, p in hf.named_parameters():  # transformers starts biases at zero: where one is counted
        if name.endswith("bias"):  # twice, or sliced wrong, the output must change
            p.data.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    return path, hf, [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]


@pytest.mark.parametrize("path_kind", ["fast", "reference"])
def test_two_ranks_match_hf_in_a_batch_staggered_and_preempted(tiny, path_kind):
    path, hf, want = tiny
    # 24 blocks of 8: the staggered run preempts; 32-token steps chunk the long prompts
    threads = torch.get_num_threads()  # (rank 0 takes its share of the cores while the ranks run)
    engine = LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=2, num_kv_blocks=24, block_size=8,
                                    max_num_batched_tokens=32, max_model_len=192,
                                    **(REFERENCE_PATH if path_kind == "reference" else {})))
    try:
        _check_batch_then_staggered(engine, hf, want)
    finally:
        engine.close()
    assert not any(p.is_alive() for p in engine.executor.ranks.procs) and torch.get_num_threads() == threads


def _check_batch_then_staggered(engine: LLMEngine, hf, want: list[list[int]]) -> None:
    attn = engine.runner.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, hf.config.num_key_value_heads // 2 or 1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    _assert_same([outs[str(i)].token_ids for i in range(len(PROMPTS))], want)
    for i, p in enumerate(PROMPTS):
        ref = _hf_log_softmax(hf, p, want[i])[len(p) - 1:]  # [MAX_NEW, V]: the generated tokens' rows
        got = torch.tensor([lp.logprob for lp in outs[str(i)].logprobs])
        assert (got - ref[torch.arange(MAX_NEW), torch.tensor(want[i])]).abs().max() < 1e-4
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    done = _run_staggered(engine, PROMPTS * 2, greedy, every=1)
    assert engine.scheduler.num_preemptions > 0
    _assert_same([done[str(i)][0] for i in range(2 * len(PROMPTS))], want * 2)


def test_shapes_that_do_not_split_are_refused_by_name(tmp_path, smollm2_tokenizer):
    make_tiny(tmp_path, smollm2_tokenizer, "llama", dict(num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(str(tmp_path), tensor_parallel_size=3)
    for bad in (0.0, -1.0, 1e30, float("nan")):  # (1e30 s would overflow the process group's timedelta)
        with pytest.raises(ValueError, match="tensor_parallel_timeout"):
            EngineConfig(model=str(tmp_path), tensor_parallel_timeout=bad).validate()


@pytest.mark.parametrize("tiny", ["kv-split"], indirect=True)
@pytest.mark.parametrize("draft", ["self", "of its own"])
def test_a_draft_model_under_two_ranks_matches_hf(tiny, tmp_path, smollm2_tokenizer, draft):
    """draft_model "self": the target's first layer drafts on both ranks (the forward message says
    how many layers run); a model of its own drafts whole on rank 0. Greedy = transformers'."""
    path, _, want = tiny
    model = "self"
    if draft == "of its own":
        make_tiny(tmp_path, smollm2_tokenizer, "llama", dict(num_hidden_layers=1, initializer_range=0.3))
        model = str(tmp_path)
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 3, "disable_by_batch_size": None,
            **({"num_layers": 1} if model == "self" else {})}
    llm = LLM(str(path), tensor_parallel_size=2, num_kv_blocks=64, block_size=8, speculative_config=spec)
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
        drafted = llm.engine.metrics.draft_tokens._value.get()
    finally:
        llm.engine.close()
    assert drafted > 0
    _assert_same([o.outputs[0].token_ids for o in outs], want)


# --- a rank that dies, hangs or waits ------------------------------------------------------------
def _two_ranks(path, timeout: float) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), tensor_parallel_size=2, num_kv_blocks=24, block_size=8,
                                  max_model_len=192, tensor_parallel_timeout=timeout))


def _greedy(engine: LLMEngine, rid: str) -> list[int]:
    engine.add_request(rid, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids
    raise AssertionError("the request did not finish")


@pytest.mark.parametrize("tiny", ["kv-split"], indirect=True)  # (one shape: the fault is not in the layers)
def test_ranks_wait_for_the_next_step_longer_than_the_timeout(tiny):
    """The timeout bounds a step, not the engine's idle time: ranks left waiting past it still serve."""
    path, _, want = tiny
    engine = _two_ranks(path, timeout=2.0)
    try:
        assert _greedy(engine, "a") == want[0]
        time.sleep(4.0)  # idle for twice the timeout (no timing is asserted)
        assert _greedy(engine, "b") == want[0]
    finally:
        engine.close()


@pytest.mark.parametrize("tiny", ["kv-split"], indirect=True)
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_ends_the_engine(tiny, fault):
    """Mid-run, rank 1 is killed (or stopped: its collectives time out): the next step raises
    DeviceFaultError instead of hanging or failing the requests one by one, close() returns and
    leaves no rank process and no process group, and a new engine can start in this process."""
    path, _, want = tiny
    engine = _two_ranks(path, timeout=3.0)
    rank = engine.executor.ranks.procs[0]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], params)
    engine.step()
    os.kill(rank.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    try:
        with pytest.raises(DeviceFaultError, match="tensor-parallel"):
            for _ in range(MAX_NEW):
                engine.step()
    finally:
        engine.close()
    rank.join(timeout=30)
    assert not rank.is_alive() and not torch.distributed.is_initialized()
    again = _two_ranks(path, timeout=30.0)
    try:
        assert _greedy(again, "b") == want[0]
    finally:
        again.close()


@pytest.mark.parametrize("kind", [*MOE, "gemma2", "gemma3"])
def test_more_families_split_over_two_ranks_match_hf(tmp_path, smollm2_tokenizer, kind):
    """MoE: each rank holds every expert's half of the units (Qwen3-MoE with a dense layer, Mixtral's
    w1/w2/w3 names). Gemma 2 (soft caps on scores and logits) and 3 (q/k norms, two RoPE bases), with
    windows. Greedy tokens and logprobs as transformers'."""
    hf = make_tiny(tmp_path, smollm2_tokenizer, *FAMILIES[kind])
    want = [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]
    llm = LLM(str(tmp_path), tensor_parallel_size=2, num_kv_blocks=64, block_size=8)
    try:
        mlp = llm.engine.runner.model.layers[0].mlp
        units = mlp.w2.shape[-1] if kind in MOE else mlp.intermediate
        assert units * 2 == (hf.config.moe_intermediate_size if kind == "qwen3_moe" else hf.config.intermediate_size)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    finally:
        llm.engine.close()
    _assert_same([o.token_ids for o in outs], want)
    exact = in_float64(hf)
    for p, o, w in zip(PROMPTS, outs, want):
        ref = _hf_log_softmax(exact, p, w)[len(p) - 1:]
        got = torch.tensor([lp.logprob for lp in o.logprobs])
        assert (got - ref[torch.arange(MAX_NEW), torch.tensor(w)]).abs().max() < 1e-4


def test_the_bundled_model_over_three_ranks_on_its_gguf_blocks(reference_prompts, hf_reference):
    """SmolLM2's 9 heads and 3 KV heads split over 3 ranks, each multiplying with its part of the
    GGUF blocks (the default path for the bundled model): transformers' greedy tokens."""
    picked = [2, 6, 9]  # prompts of 5, 64 and 220 tokens
    llm = LLM(None, tensor_parallel_size=3, num_kv_blocks=64)
    try:
        assert llm.engine.backends.gguf_linears
        assert type(llm.engine.runner.model.layers[0].self_attn.qkv_proj).__name__ == "GGUFLinear"
        outs = llm.generate([reference_prompts[i] for i in picked],
                            SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    finally:
        llm.engine.close()
    _assert_same([o.outputs[0].token_ids for o in outs], [hf_reference[i] for i in picked])
