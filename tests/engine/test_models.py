"""Tiny random Llama-family models (built here, seeded) against transformers, plus loader errors."""
import json

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import hf_greedy

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.4)  # a wide init gives peaked logits: no near-ties for argmax

VARIANTS = {
    "llama-untied-bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, rope_theta=5000.0)),
    "llama3-rope-scaling": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128})),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", dict(tie_word_embeddings=False, sliding_window=None)),
}


def make_tiny(tmp_path, tokenizer, kind: str, extra: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, **{**TINY, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_models_match_hf(tmp_path, smollm2_tokenizer, variant):
    kind, extra = VARIANTS[variant]
    hf = make_tiny(tmp_path, smollm2_tokenizer, kind, extra)
    prompts = [[5, 17, 300, 4000, 22], list(range(100, 160)), [9]]
    llm = LLM(str(tmp_path), num_kv_blocks=64, block_size=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 20)
        assert len(set(o.outputs[0].token_ids)) > 3  # a real continuation, not one repeated token


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(tmp_path))


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nope"))


def test_dummy_weights_run_without_a_checkpoint(tmp_path, smollm2_tokenizer):
    make_tiny(tmp_path, smollm2_tokenizer, "llama", {})
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    llm = LLM(str(tmp_path), load_format="dummy", num_kv_blocks=16)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
