"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks k experts per token, and each
token's output is the router-weighted sum of those experts' SwiGLU MLPs.

The step's (token, expert) pairs are sorted by expert once, so that each expert's rows are one
contiguous slice; then either torch's grouped matmul multiplies every slice by its expert in one
call (`grouped_mm`, where engine/platform.py found it works for the device and dtype), or a loop
runs one matmul per expert that has rows. Never a Python iteration per token.

Under tensor parallelism each rank holds every expert's slice of the intermediate units (rows of
w13's gate and up parts, the matching columns of w2), routes the same way (the router is whole on
every rank) and the partial outputs are summed by one all-reduce, as in a dense MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.ops import EAGER_OPS
from engine.layers.parallel import SINGLE, TensorParallel


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.renormalize, self.tp = num_experts, top_k, renormalize, tp
        intermediate_size = tp.share(intermediate_size, "the experts' intermediate size")  # this rank's units
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        # every expert's gate rows then up rows, and its down projection, stacked
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.ops = EAGER_OPS
        self.grouped_mm = False  # one grouped matmul for all experts (set by the loader where it runs)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, experts [T, k] int64), as transformers routes:
        a float32 softmax over all experts, the top k, renormalised over those k if the model says so."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = grouped_experts(x, weights, experts, self.w13, self.w2, self.ops.silu_mul, self.grouped_mm)
        return self.tp.all_reduce(out)  # (row-parallel w2)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, silu_mul, grouped_mm: bool) -> torch.Tensor:
    """x [T, H]; weights, experts [T, k]; w13 [E, 2I, H]; w2 [E, H, I] -> [T, H].

    The T*k (token, expert) pairs are sorted by expert; an expert's rows are then one slice of
    the sorted copy of x."""
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)  # pair indices, grouped by expert
    tokens = order // k  # [T*k] the token of each sorted pair
    xs = x[tokens]  # [T*k, H]
    counts = torch.zeros(w13.shape[0], dtype=torch.int64, device=x.device).index_add_(
        0, flat, torch.ones_like(flat))  # [E] rows per expert
    if grouped_mm:
        ends = counts.cumsum(0).to(torch.int32)  # [E] where each expert's slice ends
        h = F.grouped_mm(xs, w13.transpose(1, 2), offs=ends)  # [T*k, 2I]
        out = F.grouped_mm(silu_mul(h), w2.transpose(1, 2), offs=ends)  # [T*k, H]
    else:
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):  # (one host sync per layer)
            if n:
                rows = slice(start, start + n)
                out[rows] = F.linear(silu_mul(F.linear(xs[rows], w13[e])), w2[e])
                start += n
    # transformers scales each expert's output by its float32 weight, then casts back
    scaled = (out * weights.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, scaled)
