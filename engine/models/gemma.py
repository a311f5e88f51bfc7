"""Gemma 2 and Gemma 3 (text) on the Llama decoder's parts, with what sets them apart:
embeddings scaled by sqrt(hidden); RMSNorm by (1 + weight), in float32; norms after attention and
the MLP as well as before; GeGLU (tanh-approximated GELU); scores scaled by query_pre_attn_scalar;
sliding windows on the layers layer_types calls sliding. Gemma 2 soft-caps attention scores and
the final logits; Gemma 3 normalises each head's q and k and gives its local and global layers
their own RoPE bases. Under tensor parallelism they split as the Llama layers do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention import AttentionMetadata
from engine.layers.parallel import SINGLE, TensorParallel
from engine.models.llama import MLP, Attention, LlamaForCausalLM, RMSNorm, rope_tables


class GemmaRMSNorm(RMSNorm):
    """x normalised, times (1 + weight), in float32, then rounded once (transformers' Gemma norm)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__(size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GemmaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.gelu(gate, approximate="tanh") * up))  # (row-parallel)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, index: int, window: int | None, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "attention_bias", False))
        self.layer_type = cfg.layer_types[index]
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, bias, bias, window, norm=GemmaRMSNorm, tp=tp)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg, tp)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, meta, kv_cache):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class GemmaForCausalLM(LlamaForCausalLM):
    norm_class = GemmaRMSNorm

    def __init__(self, cfg, max_len: int, tp: TensorParallel = SINGLE) -> None:
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention (an embedding model's) is not supported")
        if getattr(cfg, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {cfg.hidden_activation!r} is not supported")
        super().__init__(cfg, max_len, tp)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

    def make_layer(self, cfg, index: int, window: int | None) -> nn.Module:
        return GemmaDecoderLayer(cfg, index, window, self.tp)

    def register_rope(self, cfg, max_len: int) -> None:
        """Gemma 3: tables per kind of layer (local and global RoPE bases); Gemma 2: the one table."""
        per_kind = "full_attention" in (getattr(cfg, "rope_parameters", None) or {})
        self.rope_kinds = sorted(set(cfg.layer_types)) if per_kind else []
        if not per_kind:
            super().register_rope(cfg, max_len)
        for kind in self.rope_kinds:
            cos, sin = rope_tables(cfg, max_len, kind)
            self.register_buffer(f"rope_cos_{kind}", cos, persistent=False)  # [max_len, D] float32
            self.register_buffer(f"rope_sin_{kind}", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] after the final norm."""
        h = self.embed_tokens(input_ids)
        # transformers rounds sqrt(hidden) to the model dtype before the product
        h = h * torch.tensor(self.config.hidden_size ** 0.5, dtype=h.dtype)
        tables = {kind: (getattr(self, f"rope_cos_{kind}"), getattr(self, f"rope_sin_{kind}"))
                  for kind in self.rope_kinds} or {None: (self.rope_cos, self.rope_sin)}
        rope = {kind: (cos[positions].to(h.dtype).unsqueeze(1), sin[positions].to(h.dtype).unsqueeze(1))
                for kind, (cos, sin) in tables.items()}  # [T, 1, D] each
        for layer, kv_cache in zip(self.layers, kv_caches):
            cos, sin = rope[layer.layer_type if self.rope_kinds else None]
            h = layer(h, cos, sin, meta, kv_cache)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] float32, soft-capped in the model dtype (Gemma 2);
        under tensor parallelism gathered on rank 0, None on the others."""
        logits = self.tp.gather_first(self.lm_head(hidden))
        if logits is None:
            return None
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits[:, :self.config.vocab_size].float()
