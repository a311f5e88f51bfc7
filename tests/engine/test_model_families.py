"""The model families beyond Llama (Qwen3, Qwen3-MoE, Mixtral, Gemma 2 and 3) and sliding windows
(Mistral's on every layer, Qwen2's and Gemma's on some): tiny random checkpoints built from their
transformers configs, greedy token for token with transformers and logprobs within 1e-4, with
prompts longer than the windows, in one batch and staggered under preemption, on the fast CPU paths
and the reference ones."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams, platform
from engine.core.config import EngineConfig
from engine.frontend.llm_engine import LLMEngine
from engine.layers.moe import MoE
from tests.conftest import hf_greedy
from tests.engine.test_correctness import _assert_same, _run_staggered, _tokens
from tests.engine.test_models import make_tiny

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# (transformers model_type, config beyond tests.engine.test_models.TINY)
FAMILIES = {
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),  # head_dim not hidden / heads
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                    decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe-renormalised": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                                                 norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "mistral-window": ("mistral", dict(sliding_window=16, tie_word_embeddings=False)),  # every layer
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),  # layer 1
    # layer 0 windowed, layer 1 not; caps low enough to bite; a scalar unlike head_dim (16)
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=12, query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                              final_logit_softcapping=8.0, tie_word_embeddings=False)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=12, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)),
    # longrope from position 64: the 60-token prompt crosses it while decoding, the 132-token one is past it
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=64, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
        short_factor=[1.0 + i / 4 for i in range(8)], long_factor=[1.0 + i for i in range(8)]))),
}
# a change of config that must change transformers' output, for the features tested here
UNLIKE = {"phi3-longrope": {"original_max_position_embeddings": 512, "rope_parameters": dict(
    FAMILIES["phi3-longrope"][1]["rope_parameters"], original_max_position_embeddings=512)}}
MOE = ("qwen3_moe", "mixtral")
PROMPTS = [[5, 17, 300, 4000, 22], list(range(100, 160)), [9], list(range(2000, 2130, 3)) * 3]
REFERENCE_PATH = dict(enforce_eager=True, linear_backend="torch", attention_backend="torch")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, smollm2_tokenizer):
    """(checkpoint directory, its transformers model, transformers' greedy outputs on PROMPTS)."""
    kind, extra = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(path, smollm2_tokenizer, kind, extra)
    want = [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]
    unlike = UNLIKE.get(request.param)
    if extra.get("sliding_window"):  # the window changes what transformers gives: it is tested
        # (Gemma's configs need a window: every layer made global instead)
        unlike = {"layer_types": ["full_attention"] * 2} if kind.startswith("gemma") else {"sliding_window": None}
    if unlike is not None:
        other = make_tiny(tmp_path_factory.mktemp("unlike"), smollm2_tokenizer, kind, {**extra, **unlike})
        assert [hf_greedy(other, p, MAX_NEW) for p in PROMPTS] != want
    return path, hf, want


@pytest.mark.parametrize("path_kind", ["fast", "reference"])
def test_one_batch_matches_hf_with_logprobs(family, path_kind):
    path, hf, want = family
    llm = LLM(str(path), num_kv_blocks=128, block_size=8, **(REFERENCE_PATH if path_kind == "reference" else {}))
    moes = [m for m in llm.engine.runner.model.modules() if isinstance(m, MoE)]
    assert bool(moes) == (hf.config.model_type in MOE)
    for m in moes:  # the fast path multiplies every expert in one grouped matmul, the reference one by one
        assert m.grouped_mm == platform.grouped_mm_available("cpu", torch.float32)
        m.grouped_mm = m.grouped_mm and path_kind == "fast"
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                                logprobs=2, prompt_logprobs=1))
    _assert_same(_tokens(outs), want)
    assert all(len(set(w)) > 3 for w in want)  # real continuations, not one repeated token
    exact = in_float64(hf)
    for prompt, out in zip(PROMPTS, outs):
        full = prompt + out.outputs[0].token_ids
        scored = (out.prompt_logprobs or [None])[1:] + out.outputs[0].logprobs
        got = torch.tensor([lp.logprob for lp in scored])
        rows, picked = torch.arange(len(full) - 1), torch.tensor(full[1:])
        # within 1e-4 of transformers' float32, or of the exact value: float32 itself strays ~1e-4 at
        # some of Mixtral's positions (on AVX-512: the reference path agrees with transformers there,
        # the fast path, summing in another order, with the exact value)
        refs = [_hf_log_softmax(m, prompt, out.outputs[0].token_ids)[rows, picked] for m in (hf, exact)]
        assert torch.minimum(*[(got - r).abs() for r in refs]).max() < 1e-4
    assert llm.engine.kv.pool.num_free == llm.engine.num_kv_blocks


def _hf_log_softmax(hf, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(prompt) + len(generated) - 1, V]: transformers' log-softmax scoring each token after the
    first: the prompt's from one forward over it, the generated ones' as generate() computed them
    (not one forward over the whole text, which differs under longrope past its switch)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prompt_rows = hf(ids).logits[0, :-1]  # [len(prompt) - 1, V]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(generated),
                          min_new_tokens=len(generated), do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=hf.generation_config.eos_token_id)
    assert out.sequences[0, len(prompt):].tolist() == generated
    return torch.cat([prompt_rows, torch.cat(out.logits)]).float().log_softmax(-1)


def in_float64(hf):
    """A float64 copy of a transformers model: the exact logprobs a float32 engine is held to. Where
    the engine's sums run in another order (split over ranks), transformers' own float32 can be as far
    from these as the tolerance (9.9e-5 for Mixtral's 44-token prompt on an AVX2 CPU)."""
    import copy

    exact = copy.deepcopy(hf).double()
    if hasattr(exact, "set_experts_implementation"):
        exact.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    return exact


def test_staggered_preempted_and_chunked_match_hf(family):
    path, hf, want = family
    # 24 blocks of 8 tokens hold one long sequence (148 tokens) and little else; 32-token chunks split
    # prompts. Under Mistral's window on every layer a sequence holds at most 7 blocks: 12 then.
    blocks = 12 if hf.config.model_type == "mistral" else 24
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=blocks, block_size=8, max_num_batched_tokens=32,
                                    max_model_len=192))
    done = _run_staggered(engine, PROMPTS * 2, GREEDY, every=1)
    assert engine.scheduler.num_preemptions > 0
    _assert_same([done[str(i)][0] for i in range(2 * len(PROMPTS))], want * 2)


def test_rope_on_part_of_each_head_is_refused_by_name(tmp_path, smollm2_tokenizer):
    make_tiny(tmp_path, smollm2_tokenizer, "phi3", dict(partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LLM(str(tmp_path), num_kv_blocks=16)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory, smollm2_tokenizer):
    """A tiny Mistral with a 16-token window on every layer, and transformers' greedy outputs on PROMPTS."""
    path = tmp_path_factory.mktemp("mistral")
    hf = make_tiny(path, smollm2_tokenizer, *FAMILIES["mistral-window"])
    return path, [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]


def _poison_free_blocks(engine: LLMEngine) -> None:
    """Overwrite the KV of the free blocks no prefix-cache key names (those given back outside the
    window among them): a later step that still read one of them would go wrong."""
    pool = engine.kv.pool
    ids = torch.tensor([i for i in pool._free if pool._keys[i] is None], dtype=torch.long)
    for cache in engine.runner.kv_caches:  # [2, blocks, block_size, kv_heads, D]
        cache[:, ids] = 100.0


@pytest.mark.parametrize("path_kind", ["fast", "reference"])
def test_windowed_blocks_go_back_and_are_never_read_again(mistral, path_kind):
    """Every layer windowed (16 tokens): a sequence holds its window's blocks and a step's, not its
    whole context: 146 tokens (19 blocks of 8) run on a pool of 6, one after another, token-exact."""
    path, want = mistral
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=6, block_size=8, max_num_batched_tokens=16,
                                    max_num_seqs=1, enable_prefix_caching=False, max_model_len=192,
                                    **(REFERENCE_PATH if path_kind == "reference" else {})))
    held = []
    done = _run_staggered(engine, PROMPTS, GREEDY, every=1, after_step=lambda e: (
        held.append(e.kv.pool.num_blocks - e.kv.pool.num_free), _poison_free_blocks(e)))
    _assert_same([done[str(i)][0] for i in range(len(PROMPTS))], want)
    assert engine.scheduler.num_preemptions == 0 and max(held) <= 5  # ceil((16 + 16) / 8) + 1


def test_prefix_caching_with_windows_matches_hf(mistral):
    """Prompts seen before (longer than the window) start from cached blocks, the ones before the
    window not taken back at all; the outputs stay token-exact, in a batch and under preemption."""
    path, want = mistral
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64, block_size=8, max_num_batched_tokens=32,
                                    max_model_len=192))
    first = _run_staggered(engine, PROMPTS, GREEDY, every=1, after_step=_poison_free_blocks)
    again = _run_staggered(engine, PROMPTS * 2, GREEDY, every=1, after_step=_poison_free_blocks)
    assert engine.scheduler.prefix_cache_hits >= 2 * (120 + 56)  # the two long prompts' full blocks, twice
    _assert_same([first[str(i)][0] for i in range(len(PROMPTS))], want)
    _assert_same([again[str(i)][0] for i in range(2 * len(PROMPTS))], want * 2)
