"""Tensor parallelism's pieces inside a model: which share of a layer a rank holds, and the
collectives that join the shares (torch.distributed: gloo on CPU, NCCL on CUDA).

Megatron's split, one all-reduce per block:
- column-parallel (qkv_proj, gate_up_proj): each rank holds a slice of the output rows: its own
  query heads and KV heads (where there are fewer KV heads than ranks, each rank holds the one
  its query heads read, so those are replicated), its slice of the MLP's intermediate units;
- row-parallel (o_proj, down_proj): the matching slice of the input columns; the partial outputs
  are summed by one all-reduce, and the bias, held by rank 0 only, is counted once;
- vocab-parallel embedding and LM head: each rank holds a slice of the vocabulary (padded to a
  multiple of the ranks); an embedding row comes from the rank that holds it (the others add
  zeros, one all-reduce), and the logits of a step are gathered once, so that sampling runs on
  rank 0 alone, where the requests are (their seeds, penalties and grammars live there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed's process group (None: the default one)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x, in place (each rank ends with the same tensor)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """[N, n] from each rank -> on rank 0 [N, size * n], rank 0's slice first; None elsewhere."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def share(self, n: int, what: str) -> int:
        """This rank's count of n things split evenly."""
        if n % self.size:
            raise ValueError(f"tensor_parallel_size {self.size}: {what} ({n}) must divide by it")
        return n // self.size

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head this rank holds, how many): a slice of them, or, with fewer KV heads than
        ranks, the one its query heads read (replicated on size / num_kv_heads ranks)."""
        if num_kv_heads >= self.size:
            n = self.share(num_kv_heads, "num_key_value_heads")
            return self.rank * n, n
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {self.size}: with fewer KV heads ({num_kv_heads}) "
                             "than ranks, the ranks must divide by the KV heads")
        return self.rank * num_kv_heads // self.size, 1

    def padded_vocab(self, vocab: int) -> int:
        return -(-vocab // self.size) * self.size


SINGLE = TensorParallel()


class RanksOutOfStep(RuntimeError):
    """Rank 0's part of a step every rank runs failed: a rank died or hung past the timeout, or
    rank 0's own share raised midway. The ranks no longer run the same step; the engine ends."""


@dataclass(frozen=True)
class Shard:
    """A rank's part of a whole weight [N, K] (or bias [N]): rows picked part by part, a fused
    weight's parts (q, k, v; gate, up) each on its own; or a slice of its columns. Rows past the
    end of a part are absent, and zero rows pad the result to pad_rows (a vocabulary's last rank)."""

    rows: list[tuple[int, int, int]] | None = None  # per part: (its rows in the whole, first, count)
    cols: tuple[int, int] | None = None  # (first, count)
    pad_rows: int | None = None

    def row_index(self) -> torch.Tensor:
        """[n] the whole weight's rows this rank holds, in order."""
        picks, start = [], 0
        for whole, first, n in self.rows:
            picks.append(torch.arange(start + first, start + min(first + n, whole)))
            start += whole
        return torch.cat(picks)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.cols is not None:
            first, n = self.cols
            return tensor[:, first:first + n]
        tensor = tensor[self.row_index()]
        missing = (self.pad_rows or 0) - len(tensor)
        return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])]) if missing > 0 else tensor


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by rows over the ranks (weight [padded vocab / size, hidden])."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.rows = tp.padded_vocab(vocab) // tp.size
        self.start = tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, hidden]."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)  # [T]
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.tp.all_reduce(out)
