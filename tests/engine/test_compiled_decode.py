"""The torch.compile'd CPU paged-decode attention: against a float64 reference, the engine using
it for every decode step token-equal to transformers' generate(), and the eager fallback."""
import functools

import pytest
import torch

from engine.attention import _decode
from engine.config import EngineConfig
from engine.kernels import compiled_decode
from engine.llm_engine import LLMEngine
from tests.conftest import random_decode_batch
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered

needs_inductor = pytest.mark.skipif(not compiled_decode.available(), reason="torch.compile cannot build CPU kernels here")


@needs_inductor
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch,max_len", [(1, 10), (6, 300)])  # batch 1 and a width of 1 are padded
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32)])
def test_compiled_decode_matches_reference(dtype, tol, batch, max_len, heads, kv_heads, head_dim):
    for trial in range(3):  # fresh inputs each time
        q, kv, tables, lens = random_decode_batch(batch, heads, kv_heads, head_dim, 16, dtype, "cpu", max_len)
        keys = torch.arange(tables.shape[1] * 16)
        mask = (keys[None, :] < lens[:, None])[:, None, None, :]
        ref = _decode(q.double(), kv.double(), tables, mask, head_dim ** -0.5)  # float64 reference
        with torch.inference_mode():
            out = compiled_decode.paged_decode(q, kv, tables, lens.long(), head_dim ** -0.5)
        assert out.shape == q.shape and out.dtype == dtype
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (trial, err)


@needs_inductor
def test_engine_with_compiled_decode_matches_hf(smollm2_dir, reference_prompts, hf_reference, monkeypatch):
    import engine.model_runner

    calls = []
    kernel = compiled_decode.paged_decode
    monkeypatch.setattr(compiled_decode, "paged_decode", lambda *a: calls.append(a[2].shape[0]) or kernel(*a))
    monkeypatch.setitem(engine.model_runner.COMPILED_DECODE_MIN_KEYS, torch.float32, 0)  # every step, even batch 1
    # a pool too small for all: preempted requests recompute, with prefills and decodes in one step
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=40, max_num_batched_tokens=128))
    assert engine.runner.decode_backend == "compiled"
    done = _run_staggered(engine, reference_prompts, GREEDY, every=2)
    _assert_same([done[str(i)][0] for i in range(len(reference_prompts))], hf_reference)
    assert engine.scheduler.num_preemptions > 0
    assert 1 in calls and max(calls) > 4  # batches of one and of many went through the kernel


def test_engine_falls_back_to_eager_when_inductor_cannot_build(smollm2_dir, monkeypatch, caplog):
    # as on a machine without a C++ compiler: the build fails, the engine warns and stays eager
    def broken():
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(compiled_decode, "_compiled", broken)
    monkeypatch.setattr(compiled_decode, "available", functools.cache(compiled_decode.available.__wrapped__))
    with caplog.at_level("WARNING"):
        engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8))
    assert engine.runner.decode_backend == "torch"
    assert "No working C++ compiler" in caplog.text
    with pytest.raises(ValueError, match="'compiled' needs torch.compile"):
        LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8, attention_backend="compiled"))
