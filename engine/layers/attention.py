"""Paged attention, reference backend in plain PyTorch (runs on CPU and GPU).

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim]; token slot
`block_id * block_size + offset` holds the key/value of one position of one sequence.
The batch's tokens are laid out prefills first, then one token per decoding sequence.

A layer with a sliding window W (Mistral, the local layers of Gemma, Qwen's windowed layers) lets
the query at position i see the keys at positions i - W + 1 .. i only, as transformers does. A layer
with a soft cap C (Gemma 2) squashes each scaled score s to C * tanh(s / C) before the softmax;
SDPA has no such step, so those layers attend through attend_explicit (the arithmetic of
transformers' eager attention) and the kernels apply the cap themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels import cpu

# From this many new tokens on, a CPU prefill chunk after a cached history attends to the history
# and to itself separately (prefill_after_history): faster for long chunks, slower for short ones,
# where the crossing lies (benchmarks/cpu_kernels.py --parts history; BENCHMARKS.md).
SPLIT_MIN_TOKENS = 512


@dataclass
class PrefillSpan:
    start: int  # first token of the span in the flattened batch
    end: int
    context_len: int  # tokens of the sequence in the cache once this step has run
    block_table: torch.Tensor | None  # [num_blocks] int64; None when the span is the whole context
    # [n, context_len] bool, True where a new token sees a key, for spans that are not causal (a
    # draft tree: each draft sees the history and its own branch); None: causal
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # [n] of a masked span (its keys: positions 0 .. context_len - 1)


@dataclass
class DecodeInputs:
    """What a decode backend reads, built once a step by its `prepare` and shared by every layer."""

    backend: DecodeBackend
    block_tables: torch.Tensor  # [num_decodes, width] int64 (int32 in CUDA graphs); past a row's context: stale
    # [num_decodes] keys in context, the new token's included (int32 for Triton); the kernels read it
    context_lens: torch.Tensor | None = None
    # [num_decodes, 1, 1, width * block_size] bool, True where a key is in context; the reference reads it
    key_mask: torch.Tensor | None = None
    # the kernels, under a sliding window: [num_decodes] keys to pass over at the start of each row's
    # (shifted) table, those of its first block that lie before the window
    skip: torch.Tensor | None = None
    block_size: int = 0
    windowed: dict[int, DecodeInputs] = field(default_factory=dict)  # window -> its inputs, made once a step

    def window(self, window: int | None) -> DecodeInputs:
        """The inputs of layers that see only the last `window` keys (None: these)."""
        if window is None:
            return self
        if window not in self.windowed:
            self.windowed[window] = self.backend.windowed(self, window)
        return self.windowed[window]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, pool slot of each new token
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    decode: DecodeInputs | None = None  # None: no decoding sequence this step


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, kv_heads, head_dim] into their slots."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_table [..., nb] -> k, v [..., nb * block_size, kv_heads, head_dim]."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    rows = kv_cache.view(2, num_blocks, -1)  # one row per block: contiguous copies, the fastest gather
    flat = block_table.reshape(-1)
    shape = (*block_table.shape[:-1], block_table.shape[-1] * block_size, kv_heads, head_dim)
    return rows[0].index_select(0, flat).view(shape), rows[1].index_select(0, flat).view(shape)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q [T, heads, D], k/v [T, kv_heads, D] of the new tokens -> out [T, heads, D]. window: the
    layer's sliding window (None: every earlier key); softcap: its scores' soft cap (None: none)."""
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    for span in meta.prefills:
        out[span.start:span.end] = prefill_span(q, k, v, kv_cache, span, scale, window, softcap)
    if meta.decode is not None:
        p = meta.num_prefill_tokens
        inputs = meta.decode.window(window)
        out[p:] = inputs.backend.decode(q[p:], kv_cache, inputs, scale, softcap)
    return out


# --- decode backends: one new token per sequence against its cached context ----------------------
class DecodeBackend:
    """A way to run decode attention. `prepare` turns the step's block tables and context lengths
    into the inputs this backend reads; `decode` runs one layer: q [B, heads, D] -> [B, heads, D],
    its scaled scores soft-capped where softcap is given."""

    name: str

    def prepare(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeInputs:
        """block_tables [B, width] int64, context_lens [B] int64."""
        raise NotImplementedError

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, inputs: DecodeInputs, scale: float,
               softcap: float | None = None) -> torch.Tensor:
        raise NotImplementedError

    def windowed(self, inputs: DecodeInputs, window: int) -> DecodeInputs:
        """For the kernels: each row's table from the block holding its window's first key on, its
        context counted from there, and the keys of that block before the window to pass over."""
        lens = inputs.context_lens.long()
        bs = inputs.block_size
        first = (lens - window).clamp(min=0)  # [B] the window's first key
        shift = first // bs  # [B] whole blocks before it
        cols = torch.arange(inputs.block_tables.shape[1], device=lens.device)
        cols = (cols[None, :] + shift[:, None]).clamp(max=inputs.block_tables.shape[1] - 1)  # (past the end: stale)
        tables = inputs.block_tables.gather(1, cols)
        return DecodeInputs(self, tables, context_lens=(lens - shift * bs).to(inputs.context_lens.dtype),
                            skip=(first - shift * bs).to(inputs.context_lens.dtype), block_size=bs)


class ReferenceDecode(DecodeBackend):
    """Plain PyTorch on any device: gather the blocks, then SDPA under a mask of the context."""

    name = "torch"

    def prepare(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeInputs:
        keys = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)
        mask = (keys[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, width * block_size]
        return DecodeInputs(self, block_tables, context_lens=context_lens, key_mask=mask, block_size=block_size)

    def windowed(self, inputs: DecodeInputs, window: int) -> DecodeInputs:
        keys = torch.arange(inputs.key_mask.shape[-1], device=inputs.key_mask.device)
        seen = keys[None, :] >= inputs.context_lens[:, None] - window  # [B, L]
        return DecodeInputs(self, inputs.block_tables, context_lens=inputs.context_lens,
                            key_mask=inputs.key_mask & seen[:, None, None, :], block_size=inputs.block_size)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, inputs: DecodeInputs, scale: float,
               softcap: float | None = None) -> torch.Tensor:
        return decode_reference(q, kv_cache, inputs.block_tables, inputs.key_mask, scale, softcap)


class CppDecode(DecodeBackend):
    """The CPU kernel (engine/kernels/cpu.py): reads each block in place, no gathered copy."""

    name = "cpp"

    def prepare(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeInputs:
        return DecodeInputs(self, block_tables, context_lens=context_lens, block_size=block_size)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, inputs: DecodeInputs, scale: float,
               softcap: float | None = None) -> torch.Tensor:
        return cpu.paged_decode(q, kv_cache, inputs.block_tables, inputs.context_lens, scale, inputs.skip, softcap)


class TritonDecode(DecodeBackend):
    """The CUDA kernel (engine/kernels/paged_decode.py); its int32 inputs are what CUDA graphs copy into."""

    name = "triton"

    def prepare(self, block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodeInputs:
        return DecodeInputs(self, block_tables, context_lens=context_lens.to(torch.int32), block_size=block_size)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, inputs: DecodeInputs, scale: float,
               softcap: float | None = None) -> torch.Tensor:
        from engine.kernels.paged_decode import paged_decode  # needs the triton package

        return paged_decode(q, kv_cache, inputs.block_tables, inputs.context_lens, scale, inputs.skip, softcap)


DECODE_BACKENDS: dict[str, DecodeBackend] = {b.name: b for b in (ReferenceDecode(), CppDecode(), TritonDecode())}


def prefill_span(q, k, v, kv_cache, span: PrefillSpan, scale: float, window: int | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    n, ctx = span.end - span.start, span.context_len
    if window is not None and ctx <= window:
        window = None  # every key is in the window
    qs = q[span.start:span.end].transpose(0, 1).unsqueeze(0)  # [1, heads, n, D]
    if span.block_table is None:  # nothing earlier in the cache: attend to the span itself
        kc, vc = k[span.start:span.end], v[span.start:span.end]  # [n, kv_heads, D]
        if window is None and softcap is None:
            o = F.scaled_dot_product_attention(qs, kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0),
                                               is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = prefill_masked(qs, kc, vc, scale, window, softcap)
    else:
        kc, vc = gather_kv(kv_cache, span.block_table)  # [nb * block_size, kv_heads, D]
        if span.mask is not None:
            o = attend_masked(qs, kc[:ctx], vc[:ctx], _in_window(span.mask, span.positions, window), scale, softcap)
        elif q.device.type == "cpu" and ctx > n and n >= SPLIT_MIN_TOKENS and window is None and softcap is None:
            o = prefill_after_history(qs, kc[:ctx - n], vc[:ctx - n], k[span.start:span.end],
                                       v[span.start:span.end], scale)
        else:
            o = prefill_masked(qs, kc[:ctx], vc[:ctx], scale, window, softcap)
    return o.squeeze(0).transpose(0, 1)  # [n, heads, D]


def prefill_masked(qs, k_ctx, v_ctx, scale: float, window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """qs [1, heads, n, D], the last n of the positions of k/v_ctx [ctx, kv_heads, D] -> [1, heads, n, D]."""
    n, ctx = qs.shape[2], k_ctx.shape[0]
    # query i sits at position ctx - n + i and sees keys 0..ctx - n + i (the last `window` of them)
    qpos = torch.arange(ctx - n, ctx, device=qs.device)
    mask = torch.arange(ctx, device=qs.device)[None, :] <= qpos[:, None]  # [n, ctx]
    return attend_masked(qs, k_ctx, v_ctx, _in_window(mask, qpos, window), scale, softcap)


def _in_window(mask: torch.Tensor, positions: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """mask [n, ctx], with the keys at or before position - window hidden from each query (its
    position in positions [n]; key j sits at position j)."""
    if window is None:
        return mask
    keys = torch.arange(mask.shape[1], device=mask.device)
    return mask & (keys[None, :] > positions.to(mask.device)[:, None] - window)


def attend_masked(qs, k_ctx, v_ctx, mask: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """qs [1, heads, n, D] over k/v_ctx [ctx, kv_heads, D] where mask [n, ctx] is True -> [1, heads, n, D]."""
    ks = k_ctx.transpose(0, 1).unsqueeze(0)  # [1, kv_heads, ctx, D]
    vs = v_ctx.transpose(0, 1).unsqueeze(0)
    return attend(qs, ks, vs, mask, scale, softcap)


def attend(qs, ks, vs, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """SDPA, or attend_explicit where the scores are soft-capped."""
    if softcap is None:
        return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
    return attend_explicit(qs, ks, vs, mask, scale, softcap)


def attend_explicit(qs, ks, vs, mask: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """qs [..., heads, n, D] over ks/vs [..., kv_heads, L, D] where mask (broadcast to [..., heads, n, L])
    is True, the scaled scores soft-capped -> [..., heads, n, D]. The steps and dtypes of transformers'
    eager attention: products in the model dtype, the softmax in float32."""
    group = qs.shape[-3] // ks.shape[-3]
    ks, vs = ks.repeat_interleave(group, dim=-3), vs.repeat_interleave(group, dim=-3)
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [..., heads, n, L]
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(qs.dtype), vs)


def prefill_after_history(qs, k_hist, v_hist, k_new, v_new, scale: float) -> torch.Tensor:
    """qs [1, heads, n, D] after h cached positions (k/v_hist [h, kv_heads, D]; the span's own
    k/v_new [n, kv_heads, D]) -> [1, heads, n, D].

    On CPU the masked SDPA of prefill_masked costs as much as if nothing were masked, and the
    span's causal half is masked. Here the history is attended without a mask and the span
    causally (whose kernel skips the masked half), and the two softmaxes are merged by their
    log-sum-exps, as flash attention merges its own blocks: a 4000-token prompt's second
    2048-token chunk attends 1952 x (2048 + 1952 / 2) scores instead of 1952 x 4000.
    """
    _, heads, n, head_dim = qs.shape
    kv_heads = k_hist.shape[1]
    group = heads // kv_heads
    # (the private op is the kernel SDPA dispatches to on CPU; it also returns the log-sum-exp.
    # In float32, so that bfloat16 partial results are not rounded before the merge.)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q32 = qs.float()
    # The history, unmasked: the kernel has no GQA, so the query heads of each key-value head are
    # stacked along the sequence ([1, kv_heads, group * n, D]; without a mask their order does not
    # matter) rather than the history copied once per query head.
    o_hist, lse_hist = flash(q32.reshape(1, kv_heads, group * n, head_dim), _heads_first(k_hist),
                             _heads_first(v_hist), 0.0, False, scale=scale)
    o_hist, lse_hist = o_hist.reshape(1, heads, n, head_dim), lse_hist.reshape(1, heads, n)
    # The span itself, causally: here each query head needs its own copy of the span's keys.
    k_new, v_new = (_heads_first(x).repeat_interleave(group, dim=1) for x in (k_new, v_new))
    o_new, lse_new = flash(q32, k_new, v_new, 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_hist, lse_new)  # [1, heads, n]
    w_hist = torch.exp(lse_hist - lse).unsqueeze(-1)
    w_new = torch.exp(lse_new - lse).unsqueeze(-1)
    return (o_hist * w_hist + o_new * w_new).to(qs.dtype)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[t, kv_heads, D] -> [1, kv_heads, t, D] float32 (a view where it already is float32)."""
    return x.transpose(0, 1).unsqueeze(0).float()


def decode_reference(q, kv_cache, block_tables, key_mask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """The reference decode: one new token per sequence, attending to its context (key_mask) through
    a gathered copy of its blocks. q [B, heads, D] -> [B, heads, D]."""
    kc, vc = gather_kv(kv_cache, block_tables)  # [B, L, kv_heads, D]
    qs = q.unsqueeze(2)  # [B, heads, 1, D]
    o = attend(qs, kc.transpose(1, 2), vc.transpose(1, 2), key_mask, scale, softcap)
    return o.squeeze(2)  # [B, heads, D]
