"""Llama-family decoder on paged attention: Llama, SmolLM2, TinyLlama, Mistral, Qwen2, and as
marked variants Qwen3 (RMSNorm on each head's q and k before RoPE), Mixtral and Qwen3-MoE
(routed experts in place of the MLP, engine/layers/moe.py).

Weights come from Hugging Face checkpoints; q/k/v and gate/up projections are fused into one
matmul each at load time, and each MoE layer's experts into two stacked tensors.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.kernels import cpu
from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.gguf_linear import GGUFLinear
from engine.layers.moe import MoE
from engine.layers.ops import EAGER_OPS, Ops
from engine.layers.parallel import SINGLE, Shard, TensorParallel, VocabParallelEmbedding


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


def rope_tables(hf_config, max_len: int, layer_type: str | None = None,
                long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] float32, computed as transformers' rotary embedding does.
    layer_type: for configs with RoPE parameters per kind of layer (Gemma 3), that kind's; long:
    longrope's long factors (transformers' choice past original_max_position_embeddings)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' is not supported (its frequencies depend on the sequence length)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor below 1 (RoPE on part of each head) is not supported")
    if rope_type == "default":
        dim = head_dim(hf_config)
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        if long:
            kwargs["seq_len"] = params["original_max_position_embeddings"] + 1
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    freqs = torch.arange(max_len, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def layer_windows(cfg, max_len: int) -> list[int | None]:
    """Each layer's sliding window: Mistral and Mixtral window every layer, models with `layer_types`
    (Qwen2/3 with use_sliding_window, Gemma) the "sliding_attention" ones. None where a layer sees every
    earlier key, or where the window is no shorter than the context can grow."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    if not window or window >= max_len:
        return [None] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


class Attention(nn.Module):
    def __init__(self, cfg, qkv_bias: bool, o_bias: bool, window: int | None = None, norm=RMSNorm,
                 tp: TensorParallel = SINGLE) -> None:
        """tp: this rank's share (engine/layers/parallel.py): its query heads and KV heads."""
        super().__init__()
        self.window = window
        self.tp = tp
        self.num_heads = tp.share(cfg.num_attention_heads, "num_attention_heads")
        self.first_kv_head, self.num_kv_heads = tp.kv_heads(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.head_dim = head_dim(cfg)
        # Gemma: scores scaled by query_pre_attn_scalar^-1/2 rather than head_dim's, and soft-capped (2)
        self.scale = (getattr(cfg, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias)
        self.ops = EAGER_OPS
        # Qwen3 and Gemma 3 variant: each head's q and k normalised over head_dim before RoPE
        self.qk_norm = cfg.model_type in QK_NORM_TYPES
        if self.qk_norm:
            self.q_norm = norm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = norm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (heads + 2 kv_heads) * D]
        if self.qk_norm:
            qkv = self._norm_qk(qkv)
        q, k, v = self.ops.rope_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale, self.window, self.softcap)  # [T, heads, D]
        return self.tp.all_reduce(self.o_proj(o.reshape(x.shape[0], self.q_size)))  # (row-parallel)

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)  # [T * heads, D] rows
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        return torch.cat([q, k, v], dim=-1)


class MLP(nn.Module):
    def __init__(self, cfg, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.tp = tp
        self.intermediate = tp.share(cfg.intermediate_size, "intermediate_size")  # this rank's units
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate, bias=bias)
        self.down_proj = nn.Linear(self.intermediate, cfg.hidden_size, bias=bias)
        self.ops = EAGER_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.ops.silu_mul(self.gate_up_proj(x))))  # (row-parallel)


QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3_text")


def moe_of_layer(cfg, index: int, tp: TensorParallel = SINGLE) -> MoE | None:
    """The routed experts of layer `index`, for the MoE variants (None: a dense MLP)."""
    if cfg.model_type == "mixtral":
        return MoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok, True,
                   tp)
    if cfg.model_type == "qwen3_moe" and cfg.num_experts > 0 and index not in cfg.mlp_only_layers \
            and (index + 1) % cfg.decoder_sparse_step == 0:
        return MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                   cfg.norm_topk_prob, tp)
    return None


class DecoderLayer(nn.Module):
    def __init__(self, cfg, index: int, qkv_bias: bool, o_bias: bool, window: int | None,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, qkv_bias, o_bias, window, tp=tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = moe_of_layer(cfg, index, tp) or MLP(cfg, tp)

    def forward(self, h, cos, sin, meta, kv_cache):
        a = self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache)
        h, x = self.post_attention_layernorm.add_and_norm(h, a)
        return h + self.mlp(x)


# HF checkpoint name -> (our parameter name, shard index in the fused parameter)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# an expert's projection (Mixtral's w1/w3/w2, Qwen3-MoE's names) -> (stacked parameter, half of w13)
_EXPERT = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
           "w2": ("w2", None), "down_proj": ("w2", None)}


class LlamaForCausalLM(nn.Module):
    norm_class = RMSNorm

    def __init__(self, cfg, max_len: int, tp: TensorParallel = SINGLE) -> None:
        """tp: the shard this rank holds under tensor parallelism (engine/layers/parallel.py)."""
        super().__init__()
        self.config = cfg
        self.max_len = max_len
        self.tp = tp
        self.long_rope_from: int | None = None  # longrope: original_max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if tp.size == 1 else \
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        windows = layer_windows(cfg, max_len)
        # the positions every layer attends to, where all have a window (the KV pool gives back blocks
        # before it); None where some layer sees every earlier position
        self.kv_window = max(windows) if all(windows) else None
        self.layers = nn.ModuleList(self.make_layer(cfg, i, windows[i]) for i in range(cfg.num_hidden_layers))
        # Steps of MoE layers and sliding windows are not captured in CUDA graphs: the per-expert
        # path reads its counts on the host, and neither has been run under capture on a GPU yet
        self.capturable = not any(isinstance(layer.mlp, MoE) for layer in self.layers) and not any(windows)
        self.norm = self.norm_class(cfg.hidden_size, cfg.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, tp.padded_vocab(cfg.vocab_size) // tp.size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_rope(cfg, max_len)
        self.fused_weights: list[torch.Tensor] | None = None  # see use_fused_decode

    def make_layer(self, cfg, index: int, window: int | None) -> nn.Module:
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        o_bias = bool(getattr(cfg, "attention_bias", False)) and cfg.model_type != "qwen2"
        return DecoderLayer(cfg, index, qkv_bias, o_bias, window, self.tp)

    def register_rope(self, cfg, max_len: int) -> None:
        cos, sin = rope_tables(cfg, max_len)
        params = getattr(cfg, "rope_parameters", None) or {}
        if params.get("rope_type") == "longrope":  # Phi-3: the long factors' table after the short one
            self.long_rope_from = params["original_max_position_embeddings"]
            long_cos, long_sin = rope_tables(cfg, max_len, long=True)
            cos, sin = torch.cat([cos, long_cos]), torch.cat([sin, long_sin])
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_len (x2 for longrope), D] float32
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope_rows(self, positions: list[int], seq_len: int) -> list[int]:
        """The rows of the RoPE tables for tokens of a sequence of seq_len tokens: their positions,
        but under longrope, whose long factors rotate every token of a sequence longer than
        original_max_position_embeddings (transformers recomputes the cache when a sequence grows
        past it; the scheduler does too): their rows follow the short table's."""
        if self.long_rope_from is None or seq_len <= self.long_rope_from:
            return list(positions)
        return [p + self.max_len for p in positions]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """input_ids [T], positions [T] (their rows of the RoPE tables: see rope_rows) -> hidden
        states [T, hidden] after the final norm."""
        h = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(h.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.rope_sin[positions].to(h.dtype).unsqueeze(1)
        decode = meta.decode
        if self.fused_weights is not None and not meta.prefills and decode is not None \
                and decode.backend.name == "cpp" and decode.skip is None:
            attn, weights = self.layers[0].self_attn, self.fused_weights
            if len(kv_caches) < len(self.layers):  # the first layers only (a self-draft's early exit)
                weights = weights[:len(weights) // len(self.layers) * len(kv_caches)]
            h = cpu.decode_layers(h, cos.squeeze(1), sin.squeeze(1), meta.slot_mapping, decode.block_tables,
                                  decode.context_lens, kv_caches, weights, attn.num_heads, attn.num_kv_heads,
                                  attn.scale, self.config.rms_norm_eps)
            return self.norm(h)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, meta, kv_cache)
        return self.norm(h)

    def use_fused_decode(self) -> bool:
        """Run decode-only steps through one C++ call for all layers (cpu.decode_layers), where it
        computes exactly what the layers do: every layer a plain Llama one (no sliding window, soft
        cap, q/k norm or experts, one rank) whose linears all multiply with GGUF blocks and whose
        element-wise pieces are the C++ ones. -> whether it will."""
        self.fused_weights = None
        weights: list[torch.Tensor] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [attn.qkv_proj, attn.o_proj, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)]
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if not (type(layer) is DecoderLayer and type(mlp) is MLP and self.tp.size == 1 and attn.ops.kind == "cpp"
                    and not attn.qk_norm and attn.window is None and attn.softcap is None
                    and attn.scale == self.layers[0].self_attn.scale
                    and all(isinstance(m, GGUFLinear) for m in linears)
                    and all(type(n) is RMSNorm and n.eps == self.config.rms_norm_eps for n in norms)):
                return False
            none = torch.empty(0)
            qkv, o, gate_up, down = (
                [m.q, m.scales, none if m.bias is None else m.bias] for m in linears)  # type: ignore[union-attr]
            weights += [norms[0].weight, *qkv, *o, norms[1].weight, *gate_up, *down]
        self.fused_weights = weights
        return True

    def use_ops(self, kind: str) -> None:
        """Switch every layer's element-wise pieces to `kind` (see Ops)."""
        ops = Ops(kind)
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> logits [N, vocab] float32 (under tensor parallelism: on rank 0,
        each rank's slice of the vocabulary gathered; None on the others)."""
        logits = self.tp.gather_first(self.lm_head(hidden))
        return None if logits is None else logits[:, :self.config.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        filled = dict.fromkeys(params, 0)  # elements written into each parameter
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name
            if "rotary_emb" in name or (name == "lm_head.weight" and self.tie_word_embeddings):
                continue
            try:
                target, part = self._place(name, params)
            except (KeyError, ValueError, IndexError):
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model") from None
            if self.tp.size > 1:
                tensor = self._shard(name, tensor)
            if part.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}; "
                                 f"the model's config gives {tuple(part.shape)}")
            part.copy_(tensor)
            filled[target] += tensor.numel()
        missing = [n for n, p in params.items() if filled[n] != p.numel()
                   and not (n == "lm_head.weight" and self.tie_word_embeddings)]
        if missing:
            raise ValueError(f"checkpoint lacks tensors of {len(missing)} parameters, e.g. {missing[:3]}")

    def _shard(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole checkpoint tensor (engine/layers/parallel.py); a row-parallel
        projection's bias is rank 0's alone (the all-reduce would count it once a rank)."""
        if name.endswith("bias") and name.split(".")[-2] in ("o_proj", "down_proj"):
            return tensor if self.tp.rank == 0 else torch.zeros_like(tensor)
        shard = self.shard_of(name)
        return tensor if shard is None else shard.of(tensor)

    def shard_of(self, name: str) -> Shard | None:
        """Which part of the whole tensor `name` (a checkpoint's or a fused one of ours) this rank
        holds: rows of the column-parallel projections (each fused part on its own), columns of the
        row-parallel ones, rows of the padded vocabulary; None: the whole of it."""
        cfg, tp, a = self.config, self.tp, self.layers[0].self_attn
        d, inter = a.head_dim, cfg.intermediate_size // tp.size
        q = (cfg.num_attention_heads * d, tp.rank * a.q_size, a.q_size)  # (whole rows, first, count)
        kv = (cfg.num_key_value_heads * d, a.first_kv_head * d, a.kv_size)
        mlp = (cfg.intermediate_size, tp.rank * inter, inter)
        kind = name.split(".")[-2] if "." in name else name
        if ".experts." in name:  # an expert's slice of its units, as a dense MLP's
            n = self.layers[int(name.split(".")[1])].mlp.w2.shape[-1]
            mlp = (n * tp.size, tp.rank * n, n)
            kind = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(kind, kind)
        parts = {"q_proj": [q], "k_proj": [kv], "v_proj": [kv], "qkv_proj": [q, kv, kv],
                 "gate_proj": [mlp], "up_proj": [mlp], "gate_up_proj": [mlp, mlp]}.get(kind)
        if parts is not None:
            return Shard(rows=parts)
        if kind in ("o_proj", "down_proj"):
            _, first, n = q if kind == "o_proj" else mlp
            return Shard(cols=(first, n))
        if kind in ("embed_tokens", "lm_head"):
            n = self.lm_head.out_features
            return Shard(rows=[(cfg.vocab_size, tp.rank * n, n)], pad_rows=n)  # (zeros past the vocabulary)
        return None  # norms, an MoE router

    def _place(self, name: str, params: dict) -> tuple[str, torch.Tensor]:
        """The parameter a checkpoint tensor belongs to, and the part of it that the tensor fills."""
        parts = name.split(".")
        if "experts" in parts:  # layers.L.mlp.experts.E.<projection>.weight
            i = parts.index("experts")
            target, half = _EXPERT[parts[i + 2]]
            target = ".".join(parts[:i] + [target])
            stacked = params[target].data[int(parts[i + 1])]  # [2I, H] or [H, I]
            return target, stacked if half is None else stacked.chunk(2)[half]
        fused = next(((i, _FUSED[p]) for i, p in enumerate(parts) if p in _FUSED), None)
        if fused is None:
            return name, params[name].data
        i, (fused_name, shard) = fused
        target = ".".join(parts[:i] + [fused_name] + parts[i + 1:])
        param = params[target].data
        a = self.layers[0].self_attn
        sizes = [a.q_size, a.kv_size, a.kv_size] if fused_name == "qkv_proj" else [param.shape[0] // 2] * 2
        start = sum(sizes[:shard])
        return target, param[start:start + sizes[shard]]
