"""What a rank builds (the model, its runner) and how many KV blocks its pool gets.

The pool is sized after the model is built. On CUDA, with no size given, a warm-up runs the
largest step the scheduler can make (max_num_batched_tokens prefill tokens, the logits of
max_num_seqs rows, and the largest decode batch) on a scratch pool; the pool then gets what is
left of the device's share (gpu_memory_utilization) after what is in use, the measured peak of
those activations, and the memory CUDA graphs will hold (a decode batch's activations). On CPU it
gets the configured budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.config import DEFAULT_CPU_KV_CACHE_BYTES
from engine.layers.attention import DECODE_BACKENDS, AttentionMetadata, PrefillSpan
from engine.layers.parallel import SINGLE, TensorParallel
from engine.models.llama import head_dim
from engine.models.loader import build_model
from engine.runner.model_runner import ModelRunner


@dataclass
class PoolSpec:
    """How big a KV pool to make: a block count, a byte budget, or (neither) measured on CUDA."""

    num_blocks: int | None
    budget: int | None  # bytes
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    max_num_seqs: int
    cuda_graphs: bool  # their memory pool is held beside the KV pool
    # a draft model of its own (on rank 0) keeps as many blocks; every rank counts it, so they agree
    extra_bytes_per_block: int = 0


@dataclass
class ModelSpec:
    """What a ModelRunner is built from: the engine's, and each tensor-parallel rank's (sent to
    them once, when they start)."""

    src: object  # engine.models.loader.ModelSource
    hf_config: object
    max_model_len: int
    dtype: torch.dtype
    load_format: str
    backends: object  # engine.platform.Backends
    pool: PoolSpec
    block_size: int
    seed: int
    # (the largest step's activations, a decode batch's) in bytes, once measured on CUDA
    measured: tuple[int, int] | None = None

    def build_model(self, device: torch.device, tp: TensorParallel = SINGLE) -> torch.nn.Module:
        """The model (this rank's shard under tensor parallelism), on its kernels."""
        return build_model(self.src, self.hf_config, self.max_model_len, self.dtype, device, self.load_format,
                           self.backends, tp)

    def build_runner(self, model: torch.nn.Module, device: torch.device, num_blocks: int,
                     graph_max_batch: int = 0) -> ModelRunner:
        return ModelRunner(model, self.hf_config, num_blocks, self.block_size, device, self.dtype, self.seed,
                           self.backends.attention, graph_max_batch, self.max_model_len)

    def num_blocks(self, model: torch.nn.Module, device: torch.device) -> int:
        """The pool's blocks on this rank, its model built (ValueError where none fits)."""
        pool = self.pool
        if pool.num_blocks is not None:
            return pool.num_blocks
        attn = model.layers[0].self_attn
        per_block = kv_bytes_per_block(self.hf_config, self.block_size, self.dtype, attn.num_kv_heads)
        per_block += pool.extra_bytes_per_block
        budget = pool.budget
        if budget is None and device.type == "cuda":
            budget = self._measured_budget(model, device)
        if budget is None:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of {per_block} bytes"
                             + (" (after the weights and the activations' measured peak: lower max_num_batched_"
                                "tokens or raise gpu_memory_utilization)" if pool.budget is None else ""))
        return blocks

    def _measured_budget(self, model: torch.nn.Module, device: torch.device) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        peak, decode = self.measured = profile_activations(model, self, device)
        graphs = decode if self.pool.cuda_graphs else 0
        return cuda_kv_budget(total, total - free, peak, graphs, self.pool.gpu_memory_utilization)


def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """kv_heads: the KV heads of a rank's shard (default: the model's)."""
    kv_heads = kv_heads or hf_config.num_key_value_heads
    per_token = 2 * hf_config.num_hidden_layers * kv_heads * head_dim(hf_config)
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def cuda_kv_budget(total: int, used: int, activations: int, graphs: int, utilization: float) -> int:
    """Bytes the KV pool may take: this process's share of the device (total * utilization), less
    what is in use once the model is built (weights, the CUDA context, other processes), the
    activations' measured peak (taken again by every large step) and the CUDA graphs' pool."""
    return int(total * utilization) - used - activations - graphs


@torch.inference_mode()
def profile_activations(model: torch.nn.Module, spec: ModelSpec, device: torch.device) -> tuple[int, int]:
    """(the peak bytes of the largest step above what is allocated before it, those of the largest
    decode batch alone), measured by running both on a scratch pool that holds their tokens.
    Every tensor-parallel rank runs the same passes (their collectives meet)."""
    pool, bs = spec.pool, spec.block_size
    tokens = pool.max_num_batched_tokens
    seqs = min(pool.max_num_seqs, tokens)
    attn = model.layers[0].self_attn
    blocks = -(-tokens // bs) + seqs
    shape = (2, blocks, bs, attn.num_kv_heads, attn.head_dim)
    scratch = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in model.layers]
    decoder = DECODE_BACKENDS[spec.backends.attention]

    def measure(run) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    def prefill() -> None:
        # the longest sequences the context allows: attention's cost grows with a span's length
        ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        spans, at = [], 0
        for n in _spans(tokens, spec.max_model_len):
            spans.append(PrefillSpan(at, at + n, n, None))
            at += n
        positions = torch.cat([torch.arange(sp.end - sp.start, device=device) for sp in spans])
        meta = AttentionMetadata(slot_mapping=torch.arange(tokens, device=device), prefills=spans,
                                 num_prefill_tokens=tokens)
        hidden = model(ids, positions, meta, scratch)  # [tokens, hidden]
        # the sampler's rows; prompt_logprobs over a whole step's tokens is not reserved for (as vLLM):
        # a step that runs out of memory there fails its requests alone
        model.compute_logits(hidden[-seqs:]).log_softmax(dim=-1)

    def decode() -> None:
        rows = torch.arange(seqs, device=device)
        tables = (tokens // bs + rows)[:, None]  # [seqs, 1]: a block each, past the prefill's
        meta = AttentionMetadata(slot_mapping=tables[:, 0] * bs, prefills=[], num_prefill_tokens=0,
                                 decode=decoder.prepare(tables, torch.ones(seqs, dtype=torch.int64, device=device), bs))
        hidden = model(torch.zeros(seqs, dtype=torch.int64, device=device), torch.zeros_like(rows), meta, scratch)
        model.compute_logits(hidden).log_softmax(dim=-1)

    peak = measure(prefill)
    decode_peak = measure(decode)
    scratch.clear()  # (the pool is made after)
    torch.cuda.empty_cache()
    return max(peak, decode_peak), decode_peak


def _spans(tokens: int, longest: int) -> list[int]:
    """tokens as sequences of at most `longest` each."""
    return [min(longest, tokens - at) for at in range(0, tokens, longest)]
