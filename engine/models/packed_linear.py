"""CPU fast path for linear layers: weights pre-packed once into oneDNN's blocked layout.

On CPU, MKL's sgemm re-reads the plain [out, in] weight in a cache-unfriendly order at every
call; a weight packed by oneDNN streams through the cache in the order its kernel wants. Measured
on the 2-core dev machine, all of SmolLM2's linears at 64 rows: 235 ms -> 115 ms per step
(benchmarks/BENCHMARKS.md). bfloat16 weights are packed too where the CPU has native bf16 dot
products (AVX512-BF16/AMX): half the bytes to stream, and the same kernels at a higher rate.
The plain `nn.Linear` stays the reference path.
"""
from __future__ import annotations

import torch
from torch import nn


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can run packed linears of this dtype at full speed on this CPU."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The hint only picks the blocked format; any number of rows works with it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out], in the weight's dtype."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU nn.Linear of a packable dtype by a PackedLinear; returns how many."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and onednn_available(m.weight.dtype)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear))
    return len(targets)
