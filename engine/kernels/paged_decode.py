"""Paged decode attention in Triton: one new query token per sequence, keys and values read
straight from the KV pool through the block table (no gather copy, no padding to the longest).

One program per (sequence, KV head) handles all query heads of that KV head's group, so each
KV block is read once per group; the group is padded to a 16-row tile so that both products run
on tensor cores. Softmax runs online over the blocks (flash-decoding style), accumulating in
float32; float32 caches use IEEE products (Triton's default for float32 is TF32). Shapes follow
engine/layers/attention.py: the pool of one layer is [2, num_blocks, block_size, kv_heads, head_dim].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, kv_ptr, out_ptr, tables_ptr, lens_ptr, skip_ptr, scale, softcap,
                         stride_q_seq, stride_q_head, stride_kv_kind, stride_kv_block, stride_kv_slot,
                         stride_kv_head, stride_table, stride_out_seq, stride_out_head,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, HAS_SKIP: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    ctx = tl.load(lens_ptr + seq)
    # a sliding window's keys before it, at the start of the (shifted) table's first block; that
    # block holds the window's first key too, so the running max is finite after it
    skip = tl.load(skip_ptr + seq) if HAS_SKIP else 0
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None]
    # [GROUP_PAD, HEAD_DIM]: the group's query heads, padded with zero rows to a tensor-core tile
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + d[None, :], mask=q_mask, other=0.0)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
    denom = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    k_base = kv_ptr + kv_head * stride_kv_head
    for i in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_table + i).to(tl.int64)
        in_ctx = (i * BLOCK_SIZE + t < ctx) & (i * BLOCK_SIZE + t >= skip)  # [BLOCK_SIZE]
        offs = block * stride_kv_block + t[:, None] * stride_kv_slot + d[None, :]
        k = tl.load(k_base + offs, mask=in_ctx[:, None], other=0.0)  # [BLOCK_SIZE, HEAD_DIM]
        v = tl.load(k_base + stride_kv_kind + offs, mask=in_ctx[:, None], other=0.0)
        if IEEE:  # float32 caches: full-precision products, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_SOFTCAP:  # Gemma 2: softcap * tanh(s / softcap), tanh(x) as 2 sigmoid(2x) - 1
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)
        s = tl.where(in_ctx[None, :], s, float("-inf"))  # [GROUP_PAD, BLOCK_SIZE]
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def supports(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    """The kernel's shape rules: power-of-two head_dim and block_size of at least 16 (tensor-core
    tiles, Triton ranges), whole query groups."""
    def pow2(x: int) -> bool:
        return x >= 16 and x & (x - 1) == 0

    return pow2(head_dim) and pow2(block_size) and num_heads % num_kv_heads == 0


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float, skip: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [B, heads, D]; block_tables [B, max_blocks] int; context_lens [B] int32 (>= 1); skip [B] int32:
    keys at the start of each row's first block not to attend to (a sliding window's); softcap: the
    cap of the scaled scores (Gemma 2) -> out [B, heads, D]."""
    batch, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, kv_cache, out, block_tables, context_lens, context_lens if skip is None else skip, scale, softcap or 0.0,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        IEEE=kv_cache.dtype == torch.float32, HAS_SKIP=skip is not None,
        HAS_SOFTCAP=bool(softcap), num_warps=4)
    return out
