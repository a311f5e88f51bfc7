"""A decoder layer's element-wise pieces: the eager references (the same arithmetic as
transformers) and the Ops bundle a model's modules call, eager, compiled or C++."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import cpu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers: normalise in float32, scale in the model dtype.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum and its norm."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (heads + 2 kv_heads) * D] -> q [T, heads, D], k and v [T, kv_heads, D], q and k rotated."""
    t = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(t, num_heads, head_dim), cos, sin)
    k = apply_rope(k.view(t, num_kv_heads, head_dim), cos, sin)
    return q, k, v.view(t, num_kv_heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Ops:
    """A layer's element-wise pieces. Eager they are the reference (five to ten small kernels
    each). "compiled" (CUDA): torch.compile fuses each into one kernel, which matters when a decode
    step of a small batch is mostly kernel launches. "cpp" (CPU): the C++ kernels of
    engine/kernels/cpu.cpp, one pass each, rounding where the eager code rounds."""

    def __init__(self, kind: str = "eager") -> None:
        if kind == "cpp":
            fns = [cpu.rms_norm, cpu.add_rms_norm, cpu.rope_qkv, cpu.silu_mul]
        else:
            fns = [rms_norm, add_rms_norm, rope_qkv, silu_mul]
        if kind == "compiled":
            fns = [torch.compile(fn, dynamic=True, fullgraph=True) for fn in fns]
        elif kind not in ("eager", "cpp"):
            raise ValueError(f"unknown ops kind {kind!r}")
        self.kind = kind
        self.rms_norm, self.add_rms_norm, self.rope_qkv, self.silu_mul = fns


EAGER_OPS = Ops()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
