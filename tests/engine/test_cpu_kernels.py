"""The C++ CPU kernels (paged decode attention, skinny linear): against float64 references, their
input checks, the engine using them token-equal to transformers' generate(), and the eager
fallback where they cannot be built."""
import functools

import pytest
import torch

from engine.attention import _decode
from engine.config import EngineConfig
from engine.kernels import cpu
from engine.llm_engine import LLMEngine
from engine.models.packed_linear import SKINNY_MAX_ROWS, PackedLinear
from tests.conftest import random_decode_batch
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="the C++ kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("batch,max_len", [(1, 10), (6, 300)])  # (1, 10): one sequence, one block
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32)])
def test_cpu_decode_matches_reference(dtype, tol, batch, max_len, heads, kv_heads, head_dim):
    for trial in range(3):  # fresh inputs each time
        q, kv, tables, lens = random_decode_batch(batch, heads, kv_heads, head_dim, 16, dtype, "cpu", max_len)
        keys = torch.arange(tables.shape[1] * 16)
        mask = (keys[None, :] < lens[:, None])[:, None, None, :]
        ref = _decode(q.double(), kv.double(), tables, mask, head_dim ** -0.5)  # float64 reference
        out = cpu.paged_decode(q, kv, tables, lens.long(), head_dim ** -0.5)
        assert out.shape == q.shape and out.dtype == dtype
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (trial, err)


@needs_kernel
@pytest.mark.parametrize("change,message", [
    (lambda t, lens: t.__setitem__((0, 0), 10_000), "block id out of range"),
    (lambda t, lens: t.__setitem__((1, 0), -1), "block id out of range"),
    (lambda t, lens: lens.__setitem__(0, 0), "context length out of range"),
    (lambda t, lens: lens.__setitem__(0, t.shape[1] * 16 + 1), "context length out of range"),
])
def test_cpu_decode_rejects_what_would_read_outside_the_pool(change, message):
    q, kv, tables, lens = random_decode_batch(3, 4, 2, 16, 16, torch.float32, "cpu", 60)
    lens = lens.long()
    lens[1] = tables.shape[1] * 16  # the second sequence uses its whole table
    change(tables, lens)
    with pytest.raises(RuntimeError, match=message):
        cpu.paged_decode(q, kv, tables, lens, 0.25)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 2, 3, 7])
# 1539 inputs: not a multiple of the vector width
@pytest.mark.parametrize("out_features,in_features,bias", [(960, 576, False), (37, 1539, True)])
def test_skinny_linear_matches_reference(dtype, tol, rows, out_features, in_features, bias):
    x = torch.randn(rows, in_features).to(dtype)
    w = (torch.randn(out_features, in_features) * in_features ** -0.5).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    out = cpu.skinny_linear(x, w, b)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


@needs_kernel
def test_skinny_linear_rejects_mismatched_inputs():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        cpu.skinny_linear(x, torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu.skinny_linear(x, w.double(), None)
    with pytest.raises(RuntimeError, match="bad bias"):
        cpu.skinny_linear(x, w, torch.randn(5))


@needs_kernel
def test_engine_with_cpu_kernels_matches_hf(smollm2_dir, reference_prompts, hf_reference, monkeypatch):
    calls, linear_rows = [], set()
    attend, linear = cpu.paged_decode, cpu.skinny_linear
    monkeypatch.setattr(cpu, "paged_decode", lambda *a: calls.append(a[2].shape[0]) or attend(*a))
    monkeypatch.setattr(cpu, "skinny_linear", lambda *a: linear_rows.add(a[0].shape[0]) or linear(*a))
    # a pool too small for all: preempted requests recompute, with prefills and decodes in one step
    engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=40, max_num_batched_tokens=128))
    assert engine.runner.decode_backend == "cpp"  # the defaults on CPU where the kernels build
    assert all(m.weight is not None for m in engine.runner.model.modules() if isinstance(m, PackedLinear))
    done = _run_staggered(engine, reference_prompts, GREEDY, every=2)
    _assert_same([done[str(i)][0] for i in range(len(reference_prompts))], hf_reference)
    assert engine.scheduler.num_preemptions > 0
    assert 1 in calls and max(calls) > 4  # batches of one and of many went through the attention kernel
    assert linear_rows == set(range(1, SKINNY_MAX_ROWS + 1))  # and steps of 1-2 rows through the linear one


def test_engine_falls_back_to_eager_without_a_compiler(smollm2_dir, monkeypatch, caplog, tmp_path):
    # as on a machine without a C++ compiler: the build fails, the engine warns and stays eager
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))  # no library built before
    monkeypatch.setattr(cpu, "_load", functools.cache(cpu._load.__wrapped__))
    monkeypatch.setattr(cpu, "_probe", functools.cache(cpu._probe.__wrapped__))
    with caplog.at_level("WARNING"):
        engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8))
    assert engine.runner.decode_backend == "torch"
    assert all(m.weight is None for m in engine.runner.model.modules() if isinstance(m, PackedLinear))
    assert "no-such-compiler" in caplog.text
    with pytest.raises(ValueError, match="'cpp' needs a working C\\+\\+ compiler"):
        LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8, attention_backend="cpp"))
