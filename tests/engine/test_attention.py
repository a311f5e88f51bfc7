"""Prefill attention over a cached history (a later chunk of a long prompt, or a prefix-cache hit),
spans under a mask of their own (a draft tree), and sliding windows and soft-capped scores (Gemma 2)
in prefill and in every decode backend."""
import pytest
import torch

from engine import platform
from engine.layers.attention import (
    DECODE_BACKENDS,
    SPLIT_MIN_TOKENS,
    PrefillSpan,
    gather_kv,
    prefill_after_history,
    prefill_masked,
    prefill_span,
    write_kv,
)
from tests.conftest import random_decode_batch


def reference(q, k_all, v_all, scale, visible=None, softcap=None):
    """q [n, heads, D] at the last n of ctx positions; k/v_all [ctx, kv_heads, D]; float64 math.
    visible [n, ctx] bool: the keys each query sees (default: causal); softcap: scores capped so."""
    n, heads, _ = q.shape
    ctx, kv_heads, _ = k_all.shape
    k = k_all.double().repeat_interleave(heads // kv_heads, dim=1)  # [ctx, heads, D]
    v = v_all.double().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if visible is None:
        visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # [n, ctx]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", p, v)


# float32: as close as the masked SDPA it replaces (~2e-6 here); bfloat16: one rounding of the
# float64 result (unit roundoff 2^-8), as SDPA rounds once
@pytest.mark.parametrize("dtype,rel,tol", [(torch.float32, 0.0, 4e-6), (torch.bfloat16, 2.0 ** -8, 1e-5)])
@pytest.mark.parametrize("history,n", [(37, 1), (16, 5), (100, 60), (3, 120), (50, SPLIT_MIN_TOKENS + 9)])
@pytest.mark.parametrize("path", ["paged", "split"])
def test_prefill_after_a_history_matches_masked_attention(path, dtype, rel, tol, history, n):
    # "paged": the engine's prefill_span through a block table (the split from SPLIT_MIN_TOKENS new
    # tokens on, the masked SDPA below); "split": the history + causal-span merge at every size.
    # (The masked SDPA in bfloat16 is not within one rounding: it is checked against itself.)
    torch.manual_seed(history + n)
    heads, kv_heads, d, block_size = 9, 3, 64, 16
    ctx = history + n
    num_blocks = (ctx + block_size - 1) // block_size
    k_all = torch.randn(ctx, kv_heads, d).to(dtype)
    v_all = torch.randn(ctx, kv_heads, d).to(dtype)
    q = (torch.randn(n, heads, d) * 2).to(dtype)  # larger scores: a sharper softmax to merge
    if path == "paged":
        kv_cache = torch.zeros(2, num_blocks + 3, block_size, kv_heads, d, dtype=dtype)
        table = torch.randperm(num_blocks + 3)[:num_blocks]  # blocks scattered over the pool
        slots = table[torch.arange(ctx) // block_size] * block_size + torch.arange(ctx) % block_size
        write_kv(kv_cache, k_all, v_all, slots)  # as earlier steps and this one have written them
        span = PrefillSpan(start=0, end=n, context_len=ctx, block_table=table)
        out = prefill_span(q, k_all[history:], v_all[history:], kv_cache, span, d ** -0.5)
    else:
        qs = q.transpose(0, 1).unsqueeze(0)
        out = prefill_after_history(qs, k_all[:history], v_all[:history], k_all[history:], v_all[history:],
                                     d ** -0.5).squeeze(0).transpose(0, 1)
    assert out.dtype == dtype and out.shape == (n, heads, d)
    if path == "paged" and n < SPLIT_MIN_TOKENS:  # the masked SDPA, on the history read through the blocks
        dense = prefill_masked(q.transpose(0, 1).unsqueeze(0), k_all, v_all, d ** -0.5)
        assert torch.equal(out, dense.squeeze(0).transpose(0, 1))
    else:
        want = reference(q, k_all, v_all, d ** -0.5)
        assert ((out.double() - want).abs() <= rel * want.abs() + tol).all()


@pytest.mark.parametrize("history,n", [(1, 2), (20, 7), (45, 31)])
def test_a_span_under_its_own_mask_matches_dense_attention(history, n):
    """A draft tree's span: each new token sees the history, itself and some earlier new tokens
    (a random choice here), its KV in blocks scattered over the pool."""
    torch.manual_seed(n)
    heads, kv_heads, d, block_size = 9, 3, 64, 4
    ctx = history + n
    num_blocks = (ctx + block_size - 1) // block_size
    k_all, v_all = torch.randn(ctx, kv_heads, d), torch.randn(ctx, kv_heads, d)
    q = torch.randn(n, heads, d) * 2
    kv_cache = torch.zeros(2, num_blocks + 5, block_size, kv_heads, d)
    table = torch.randperm(num_blocks + 5)[:num_blocks]
    slots = table[torch.arange(ctx) // block_size] * block_size + torch.arange(ctx) % block_size
    write_kv(kv_cache, k_all, v_all, slots)
    among = torch.rand(n, n) < 0.4  # [n, n]: which earlier new tokens each one sees
    mask = torch.cat([torch.ones(n, history, dtype=torch.bool),
                      (among.tril(-1) | torch.eye(n, dtype=torch.bool))], dim=1)  # [n, ctx]
    assert not mask.all()  # not causal: some earlier new tokens are hidden
    span = PrefillSpan(start=0, end=n, context_len=ctx, block_table=table, mask=mask)
    out = prefill_span(q, k_all[history:], v_all[history:], kv_cache, span, d ** -0.5)
    want = reference(q, k_all, v_all, d ** -0.5, visible=mask)
    assert (out.double() - want).abs().max() <= 4e-6


def _windowed_dense(q, kv, tables, lens, scale, window, softcap=None):
    """Each row's query against the last `window` keys of its context only, in float64, one row at a time."""
    out = []
    for b in range(q.shape[0]):
        k, v = (gather_kv(kv, tables[b])[i][:lens[b]].double() for i in (0, 1))  # [ctx, kv_heads, D]
        k, v = k[-window:], v[-window:]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [w, heads, D]
        s = torch.einsum("hd,thd->ht", q[b].double(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out.append(torch.einsum("ht,thd->hd", s.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (16, None), (37, 2.0), (1000, None), (1000, 2.0)])
def test_decode_under_a_sliding_window_sees_only_the_last_keys(backend, window, softcap):
    if backend == "cpp" and not platform.cpp_kernels_available():
        pytest.skip("the C++ kernel cannot be built here")
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = "cuda" if backend == "triton" else "cpu"
    q, kv, tables, lens = random_decode_batch(6, 8, 2, 64, 16, torch.float32, device, 200)
    lens[0] = 1  # a lone key; and a context of whole blocks, the window's first key on a block edge
    lens[1] = 64
    scale = 0.125
    decoder = DECODE_BACKENDS[backend]
    inputs = decoder.prepare(tables.long(), lens.long(), 16).window(window)
    q = q * 8  # scores well past the cap, where capping changes the weights
    out = decoder.decode(q, kv, inputs, scale, softcap)
    want = _windowed_dense(q, kv, tables, lens, scale, window, softcap)
    if softcap is not None:
        assert (want - _windowed_dense(q, kv, tables, lens, scale, window)).abs().max() > 0.1
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("history,n,window,softcap", [(0, 40, 7, None), (30, 20, 16, None), (100, 1, 16, None),
                                                      (5, 600, 100, None), (3, 9, 64, None), (0, 40, 7, 1.5),
                                                      (0, 40, None, 1.5), (30, 20, 16, 1.5), (5, 600, None, 1.5)])
def test_prefill_under_a_sliding_window_sees_only_the_last_keys(history, n, window, softcap):
    torch.manual_seed(history + n)
    ctx, bs = history + n, 16
    kv = torch.zeros(2, ctx // bs + 1, bs, 2, 32)
    k, v = torch.randn(ctx, 2, 32), torch.randn(ctx, 2, 32)
    write_kv(kv, k, v, torch.arange(ctx))
    q = torch.randn(n, 8, 32) * 3
    table = None if history == 0 else torch.arange(ctx // bs + 1)
    span = PrefillSpan(0, n, ctx, table)
    got = prefill_span(q, k[history:], v[history:], kv, span, 0.2, window, softcap)
    pos = torch.arange(history, ctx)[:, None]
    keys = torch.arange(ctx)[None, :]
    want = reference(q, k, v, 0.2, (keys <= pos) & (keys > pos - (window or ctx)), softcap)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
