"""The KV pool is sized once the model is built: on CPU from the configured budget, on CUDA (no
size given) from what a warm-up at the largest step measured (the CUDA test skips without one)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.runner.model_spec import cuda_kv_budget, kv_bytes_per_block
from tests.engine.test_models import TINY, make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny(path, smollm2_tokenizer, "llama", {})
    return path


def _per_block(block_size: int = 16) -> int:
    """TINY's KV bytes per block in float32, counted by hand: keys and values, each layer, each KV head."""
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    return 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * head_dim * block_size * 4


def test_bytes_per_block_count_keys_and_values_of_every_layer_and_kv_head():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", **TINY)
    assert kv_bytes_per_block(cfg, 16, torch.float32) == _per_block(16)
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == _per_block(16) // 2
    assert kv_bytes_per_block(cfg, 16, torch.float32, kv_heads=1) == _per_block(16) // 2  # a rank's share


@pytest.mark.parametrize("budget,want", [(None, DEFAULT_CPU_KV_CACHE_BYTES // _per_block()),
                                         (5 * _per_block() + 7, 5)])
def test_the_cpu_pool_holds_what_the_budget_buys(tiny_dir, budget, want):
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), kv_cache_memory=budget))
    assert engine.num_kv_blocks == want == engine.kv.pool.num_free
    caches = engine.runner.kv_caches
    assert sum(c.numel() * c.element_size() for c in caches) == want * _per_block()  # the pool made is that big


def test_a_budget_below_one_block_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="holds no block"):
        LLMEngine(EngineConfig(model=str(tiny_dir), kv_cache_memory=_per_block() - 1))


def test_the_cuda_budget_leaves_room_for_what_was_measured():
    gib = 1 << 30
    # 80 GiB at 0.9: 72 GiB, less 10 in use (weights, context), 3 of activations, 1 of graphs
    assert cuda_kv_budget(80 * gib, 10 * gib, 3 * gib, gib, 0.9) == 58 * gib
    assert cuda_kv_budget(80 * gib, 10 * gib, 3 * gib, 0, 0.9) == 59 * gib  # no graphs held
    assert cuda_kv_budget(80 * gib, 70 * gib, 3 * gib, 0, 0.9) < 0  # nothing left: no block (refused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_pool_is_sized_after_the_model_and_leaves_the_measured_headroom(tiny_dir):
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    util = 0.5
    llm = LLM(str(tiny_dir), device="cuda", dtype="float32", gpu_memory_utilization=util,
              max_num_batched_tokens=4096, max_num_seqs=64)
    engine = llm.engine
    peak, decode = engine.executor.measured_activations
    assert peak > 0 and decode > 0
    pool = sum(c.numel() * c.element_size() for c in engine.runner.kv_caches)
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    # sized after the model: the weights and the measured peak fit beside the pool within the share
    in_use_before = total - free_before
    assert in_use_before + weights + pool + peak <= total * util + engine.config.block_size * _per_block()
    # and the largest step runs in what was left: a full step of prefill, then decodes
    torch.cuda.reset_peak_memory_stats()
    prompts = [list(range(100, 100 + 500)) for _ in range(8)]  # 4000 tokens in one step
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert in_use_before + torch.cuda.max_memory_allocated() <= total * util * 1.02
