"""Llama-family decoder (Llama, SmolLM2, TinyLlama, Mistral, Qwen2) on paged attention.

Weights come from Hugging Face checkpoints; q/k/v and gate/up projections are fused into one
matmul each at load time.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.ops import EAGER_OPS, Ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h + delta and its norm, in one fused kernel when compiled."""
        return self.ops.add_rms_norm(h, delta, self.weight, self.eps)


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def rope_tables(hf_config, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] float32, computed as transformers' rotary embedding does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported (its frequencies depend on the sequence length)")
    if rope_type == "default":
        dim = int(head_dim(hf_config) * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


class Attention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim(cfg)
        self.scale = self.head_dim ** -0.5
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias)
        self.ops = EAGER_OPS

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.ops.rope_qkv(self.qkv_proj(x), cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, heads, D]
        return self.o_proj(o.reshape(x.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, meta, kv_cache):
        a = self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache)
        h, x = self.post_attention_layernorm.add_and_norm(h, a)
        return h + self.mlp(x)


# HF checkpoint name -> (our parameter name, shard index in the fused parameter)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg, max_len: int) -> None:
        super().__init__()
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        o_bias = bool(getattr(cfg, "attention_bias", False)) and cfg.model_type != "qwen2"
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, o_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg, max_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_len, D] float32
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] after the final norm."""
        h = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(h.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[positions].to(h.dtype).unsqueeze(1)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, meta, kv_cache)
        return self.norm(h)

    def use_ops(self, kind: str) -> None:
        """Switch every layer's element-wise pieces to `kind` (see Ops)."""
        ops = Ops(kind)
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            parts = name.split(".")
            fused = next(((i, _FUSED[p]) for i, p in enumerate(parts) if p in _FUSED), None)
            if fused is None:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
                params[name].data.copy_(tensor)
                loaded.add(name)
                continue
            i, (target, shard) = fused
            name = ".".join(parts[:i] + [target] + parts[i + 1:])
            self._load_shard(params[name], target, shard, tensor)
            loaded.add(f"{name}#{shard}")
        self._check_all_loaded(params, loaded)

    def _load_shard(self, param: nn.Parameter, target: str, shard: int, tensor: torch.Tensor) -> None:
        a = self.layers[0].self_attn
        if target == "qkv_proj":
            sizes = [a.q_size, a.kv_size, a.kv_size]
        else:
            sizes = [param.shape[0] // 2] * 2
        start = sum(sizes[:shard])
        param.data[start:start + sizes[shard]].copy_(tensor)

    def _check_all_loaded(self, params: dict, loaded: set[str]) -> None:
        missing = []
        for name in params:
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            shards = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 0
            keys = [f"{name}#{s}" for s in range(shards)] if shards else [name]
            missing += [k for k in keys if k not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
