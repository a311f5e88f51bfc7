"""The C++ CPU kernels (paged decode attention, skinny linear, the element-wise pieces): against
references, their input checks, the engine using them token-equal to transformers' generate()
(with the GGUF-block linears of test_gguf_linear.py too), and the eager fallback where they
cannot be built."""
import functools
from pathlib import Path

import pytest
import torch

from engine import platform
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.kernels import cpu
from engine.layers import ops
from engine.layers.packed_linear import SKINNY_MAX_ROWS, PackedLinear
from engine.models import llama
from engine.models.loader import GGUF_ORIGIN_FILE
from tests.conftest import decode_reference, random_decode_batch
from tests.engine.test_correctness import GREEDY, _assert_same, _run_staggered

needs_kernel = pytest.mark.skipif(not platform.cpp_kernels_available(), reason="the C++ kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("batch,max_len", [(1, 10), (6, 300)])  # (1, 10): one sequence, one block
# Keys are scored 16 tokens at a time (AVX-512, head_dim a multiple of 16) where a block holds whole
# sixteens (block size 16, 32, 48: one, two, three a block; head_dim 128: eight vectors a key), one
# at a time elsewhere (block size 8, head_dim 32) and past a sequence's last whole sixteen.
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 2, 128, 32),
                                                                (8, 2, 64, 8), (8, 2, 64, 48)])
def test_cpu_decode_matches_reference(dtype, tol, batch, max_len, heads, kv_heads, head_dim, block_size):
    for trial in range(3):  # fresh inputs each time
        q, kv, tables, lens = random_decode_batch(batch, heads, kv_heads, head_dim, block_size, dtype, "cpu", max_len)
        ref = decode_reference(q, kv, tables, lens, head_dim ** -0.5)
        out = cpu.paged_decode(q, kv, tables, lens.long(), head_dim ** -0.5)
        assert out.shape == q.shape and out.dtype == dtype
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (trial, err)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_decode_splits_long_sequences_between_threads(batch):
    # fewer sequences than threads: each is cut into stretches whose partials are merged; with 3
    # sequences of which one is short, some stretches are empty
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for trial in range(3):
            kv = torch.randn(2, batch * 70 + 3, 16, 3, 64)
            tables = torch.randperm(batch * 70 + 3)[:batch * 70].view(batch, 70)
            lens = torch.tensor([1100, 5, 700][:batch])  # 1100: 69 blocks, four stretches at batch 1, two at 3
            q = torch.randn(batch, 9, 64)
            ref = decode_reference(q, kv, tables, lens, 0.125)
            out = cpu.paged_decode(q, kv, tables, lens, 0.125)
            assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5, trial
    finally:
        torch.set_num_threads(threads)


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


def _elementwise_inputs(tokens: int, dtype: torch.dtype) -> dict:
    """SmolLM2's shapes: hidden 576, 9 query and 3 KV heads of 64, intermediate 1536."""
    cfg = type("Cfg", (), {"rope_parameters": {"rope_theta": 100000.0}, "head_dim": 64})()
    cos, sin = llama.rope_tables(cfg, 2048)
    positions = torch.randint(0, 2048, (tokens,))
    return {"h": torch.randn(tokens, 576).to(dtype), "delta": torch.randn(tokens, 576).to(dtype),
            "w": (torch.rand(576) + 0.5).to(dtype), "qkv": torch.randn(tokens, 960).to(dtype),
            "cos": cos[positions].to(dtype).unsqueeze(1), "sin": sin[positions].to(dtype).unsqueeze(1),
            "gate_up": (torch.randn(tokens, 3072) * 4).to(dtype)}


def _elementwise(impl, x: dict) -> list[torch.Tensor]:
    """Every output of the four pieces, computed by `impl` (the eager module or the kernels)."""
    return [impl.rms_norm(x["h"], x["w"], 1e-5), *impl.add_rms_norm(x["h"], x["delta"], x["w"], 1e-5),
            *impl.rope_qkv(x["qkv"], x["cos"], x["sin"], 9, 3, 64), impl.silu_mul(x["gate_up"])]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 300])  # 300: split between threads
def test_elementwise_kernels_match_eager(dtype, tokens):
    x = _elementwise_inputs(tokens, dtype)
    # within a few units of rounding of the dtype: the kernels round where the eager code does, and
    # only float32 sums (the norm's) and exp differ in their last bits
    eps = torch.finfo(dtype).eps
    for got, want in zip(_elementwise(cpu, x), _elementwise(ops, x), strict=True):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=4 * eps, atol=eps)
    if dtype == torch.float32:  # and close to the exact values, not merely to the eager float32 ones
        exact = _elementwise(ops, {k: v.double() for k, v in x.items()})
        for got, want in zip(_elementwise(cpu, x), exact, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


@needs_kernel
def test_silu_holds_its_accuracy_over_the_whole_range():
    # the kernel's own vectorised exp: wide inputs, where e^-x overflows or underflows
    g = torch.cat([torch.linspace(-120, 120, 400_001), torch.tensor([0.0, -1e-30, 1e-30, 88.5, -88.5])])
    out = cpu.silu_mul(torch.cat([g, torch.ones_like(g)]).view(1, -1))[0].double()  # gate g, up 1
    want = torch.nn.functional.silu(g.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=5e-7, atol=1e-30)


@needs_kernel
def test_elementwise_kernels_reject_mismatched_inputs():
    x = _elementwise_inputs(2, torch.float32)
    with pytest.raises(RuntimeError, match="rms_norm"):
        cpu.rms_norm(x["h"], x["w"][:10], 1e-5)
    with pytest.raises(RuntimeError, match="bad residual"):
        cpu.add_rms_norm(x["h"], x["delta"][:1], x["w"], 1e-5)
    with pytest.raises(RuntimeError, match="head shapes disagree"):
        cpu.rope_qkv(x["qkv"], x["cos"], x["sin"], 9, 2, 64)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu.rope_qkv(x["qkv"], x["cos"].double(), x["sin"], 9, 3, 64)
    with pytest.raises(RuntimeError, match="silu_mul"):
        cpu.silu_mul(x["gate_up"][:, :-1])


def _without_gguf_origin(model_dir: Path, tmp_path: Path) -> Path:
    """The same model as a plain HF directory (links to its files), as a user's own would be."""
    for f in model_dir.iterdir():
        if f.name != GGUF_ORIGIN_FILE:
            (tmp_path / f.name).symlink_to(f)
    return tmp_path


@needs_kernel
@pytest.mark.parametrize("linears", ["gguf", "onednn+cpp"])
def test_engine_with_cpu_kernels_matches_hf(linears, smollm2_dir, reference_prompts, hf_reference, monkeypatch,
                                            tmp_path):
    calls, linear_rows = [], set()
    attend, linear = cpu.paged_decode, cpu.gguf_linear if linears == "gguf" else cpu.skinny_linear
    monkeypatch.setattr(cpu, "paged_decode", lambda *a: calls.append(a[2].shape[0]) or attend(*a))
    monkeypatch.setattr(cpu, linear.__name__, lambda *a: linear_rows.add(a[0].shape[0]) or linear(*a))
    # "gguf": the bundled model, converted from its GGUF; "onednn+cpp": the same weights in a plain HF directory
    model_dir = smollm2_dir if linears == "gguf" else _without_gguf_origin(smollm2_dir, tmp_path)
    # a pool too small for all: preempted requests recompute, with prefills and decodes in one step
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=40, max_num_batched_tokens=128))
    assert engine.runner.decode_backend == "cpp"  # the defaults on CPU where the kernels build
    assert all(m.ops.kind == "cpp" for m in engine.runner.model.modules() if hasattr(m, "ops"))
    assert f"linears={linears} decode_attention=cpp elementwise=cpp" in engine.describe()  # the startup line
    done = _run_staggered(engine, reference_prompts, GREEDY, every=2)
    _assert_same([done[str(i)][0] for i in range(len(reference_prompts))], hf_reference)
    assert engine.scheduler.num_preemptions > 0
    assert 1 in calls and max(calls) > 4  # batches of one and of many went through the attention kernel
    if linears == "gguf":  # every linear, every step: decodes, prefills, both in one step
        assert {1, 2, 3} <= linear_rows and max(linear_rows) > 100
    else:  # steps of 1-2 rows through the skinny kernel
        assert linear_rows == set(range(1, SKINNY_MAX_ROWS + 1))


def test_engine_falls_back_to_eager_without_a_compiler(smollm2_dir, monkeypatch, caplog, tmp_path):
    # as on a machine without a C++ compiler: the build fails, the engine warns and stays eager
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))  # no library built before
    monkeypatch.setattr(cpu, "load", functools.cache(cpu.load.__wrapped__))
    monkeypatch.setattr(platform, "_probe", functools.cache(platform._probe.__wrapped__))
    with caplog.at_level("WARNING"):
        engine = LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8))
    assert engine.runner.decode_backend == "torch"
    assert all(m.weight is None for m in engine.runner.model.modules() if isinstance(m, PackedLinear))
    assert all(m.ops.kind == "eager" for m in engine.runner.model.modules() if hasattr(m, "ops"))
    assert "linears=onednn decode_attention=torch elementwise=eager" in engine.describe()
    assert "no-such-compiler" in caplog.text
    with pytest.raises(ValueError, match="'cpp' needs a working C\\+\\+ compiler"):
        LLMEngine(EngineConfig(model=str(smollm2_dir), num_kv_blocks=8, attention_backend="cpp"))
