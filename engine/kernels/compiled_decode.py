"""Paged decode attention for CPU, fused by torch.compile (inductor's C++ backend).

Eager PyTorch has to gather every sequence's blocks into a dense copy before attending
(engine/attention.py `_decode`): the cache is read, the copy written, and the copy read again by
scaled_dot_product_attention, which reads it once per query head of a GQA group. At 64 sequences
of ~180 tokens that is ~3.5 ms a layer, half of a SmolLM2 decode step on the 2-core dev machine.
Written as broadcast-multiply-and-sum, inductor folds the block-table lookup into the loads of
its reductions, so the pool is read in place and no copy is written (2.0 ms; BENCHMARKS.md).

Compiling needs a C++ compiler at run time; `available()` tries it once and the engine falls
back to the eager path where it fails.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, D]; k_cache, v_cache [num_blocks, block_size, kv_heads, D]; block_tables [B, nb];
    context_lens [B] -> out [B, heads, D]. Accumulates in float32 whatever the cache dtype."""
    batch, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    nb = block_tables.shape[1]
    k = k_cache[block_tables].unsqueeze(4).float()  # [B, nb, bs, kv_heads, 1, D], never materialised
    v = v_cache[block_tables].unsqueeze(4).float()
    qg = q.view(batch, 1, 1, kv_heads, num_heads // kv_heads, head_dim).float()  # [B, 1, 1, kvh, G, D]
    s = (qg * k).sum(-1) * scale  # [B, nb, bs, kvh, G]
    pos = torch.arange(nb * block_size, device=q.device).view(1, nb, block_size, 1, 1)
    s = torch.where(pos < context_lens.view(batch, 1, 1, 1, 1), s, float("-inf"))
    p = torch.exp(s - s.amax(dim=(1, 2), keepdim=True))
    o = (p.unsqueeze(-1) * v).sum(dim=(1, 2)) / p.sum(dim=(1, 2)).unsqueeze(-1)  # [B, kvh, G, D]
    return o.reshape(batch, num_heads, head_dim).to(q.dtype)


@functools.cache
def _compiled():
    return torch.compile(_attend, dynamic=True, fullgraph=True)


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """q [B, heads, D]; kv_cache [2, num_blocks, block_size, kv_heads, D] -> out [B, heads, D].
    A batch or table width of 1 would make dynamo specialise on it and compile again mid-serving,
    so both are padded to 2 (a spare column is masked out, a spare row dropped)."""
    batch, width = block_tables.shape
    # a fresh q: a slice of the step's queries (after its prefill tokens) has a storage offset,
    # and dynamo would compile once more for offset 0 vs not
    q = q.clone(memory_format=torch.contiguous_format)
    if width == 1:
        block_tables = torch.cat([block_tables, block_tables], dim=1)
    if batch == 1:
        q, block_tables, context_lens = (torch.cat([x, x]) for x in (q, block_tables, context_lens))
    return _compiled()(q, kv_cache[0], kv_cache[1], block_tables, context_lens, scale)[:batch]


@functools.cache
def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether inductor can build CPU kernels here (a C++ compiler and headers); tried once per
    dtype, which also compiles the kernel for that dtype before the first request needs it."""
    try:
        # Every size distinct and above 1, so that the graph compiled here is the general one
        # (dynamo would otherwise guard on sizes that happen to be equal, or on sizes of 1); the
        # cache made as the engine makes it (a normal tensor), the rest in the engine's step mode
        # (dynamo guards on both).
        kv = torch.rand(2, 7, 4, 3, 8, dtype=dtype)  # 7 blocks of 4 slots, 3 KV heads, head_dim 8
        with torch.inference_mode():
            q = torch.rand(5, 6, 8, dtype=dtype)  # 5 sequences, 6 query heads
            tables, lens = torch.randint(0, 7, (5, 9)), torch.tensor([17, 3, 36, 1, 30])
            want = _attend(q, kv[0], kv[1], tables, lens, 0.5)
            torch.testing.assert_close(paged_decode(q, kv, tables, lens, 0.5), want)
        return True
    except Exception as e:  # no compiler, no headers, a broken toolchain: the eager path still works
        log.warning("compiled CPU decode attention unavailable (%s: %s); using the eager path",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
