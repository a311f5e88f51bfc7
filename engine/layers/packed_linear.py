"""CPU fast path for linear layers: weights pre-packed once into oneDNN's blocked layout.

On CPU, MKL's sgemm re-reads the plain [out, in] weight in a cache-unfriendly order at every
call; a weight packed by oneDNN streams through the cache in the order its kernel wants, about
twice as fast (BENCHMARKS.md, "Offline throughput"). bfloat16 weights are packed too where the CPU has native bf16 dot
products (AVX512-BF16/AMX): half the bytes to stream, and the same kernels at a higher rate.
The plain `nn.Linear` stays the reference path.

At 1-2 rows (a decode step of one or two sequences) a C++ kernel streaming the plain weight is
faster still (engine/kernels/cpu.py); for it the layer keeps both forms, twice the weight memory.

A model that came from a GGUF file multiplies with the file's blocks instead where they reproduce
its float32 weights (engine/layers/gguf_linear.py); these packed layers serve every other model.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import cpu


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can run packed linears of this dtype at full speed on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


# Up to this many rows the C++ kernel beats oneDNN's packed one; at 3 they are even (float32) or
# oneDNN wins (bfloat16): benchmarks/cpu_kernels.py --parts streamed, BENCHMARKS.md.
SKINNY_MAX_ROWS = 2


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, skinny: bool = False, batch_hint: int = 64) -> None:
        """skinny: also keep the plain weight, for the C++ kernel at up to SKINNY_MAX_ROWS rows."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The hint only picks the blocked format; any number of rows works with it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()
        self.weight = linear.weight.detach().contiguous() if skinny else None  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out], in the weight's dtype."""
        if self.weight is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            return cpu.skinny_linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module, skinny: bool = False) -> int:
    """Replace every CPU nn.Linear of a packable dtype by a PackedLinear; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and onednn_available(m.weight.dtype)]
    for name, linear in targets:
        model.set_submodule(name, PackedLinear(linear, skinny))
    return len(targets)
