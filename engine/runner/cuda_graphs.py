"""CUDA graphs for decode-only steps.

A decode step of a small model is hundreds of short kernels; launched one by one from Python
the GPU idles between them. Each graph here replays the whole forward pass of one batch-size
bucket in one launch. Inputs live in static buffers the graphs were captured on; a batch of B
sequences runs in the smallest bucket >= B, its spare rows writing their keys and values into
a scratch block no sequence owns and attending to that block alone.

Only the Triton decode kernel can be captured: it reads each sequence's length from a tensor,
where the reference path shapes its mask by the batch's longest context.
"""
from __future__ import annotations

import torch

from engine.layers.attention import DECODE_BACKENDS, AttentionMetadata, DecodeInputs


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_batch: int, max_blocks: int,
                 scratch_block: int, block_size: int) -> None:
        device = kv_caches[0].device
        self.model, self.kv_caches = model, kv_caches
        self.scratch_block, self.block_size = scratch_block, block_size
        self.sizes = bucket_sizes(max_batch)

        def zeros(*shape: int, dtype=torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids, self.positions, self.slots = zeros(max_batch), zeros(max_batch), zeros(max_batch)
        self.tables = zeros(max_batch, max_blocks, dtype=torch.int32)
        self.lens = zeros(max_batch, dtype=torch.int32)
        self._pad(0, max_batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps that ran as a graph (tests and benchmarks read it)
        self._capture()

    def _meta(self, size: int) -> AttentionMetadata:
        decode = DecodeInputs(DECODE_BACKENDS["triton"], self.tables[:size], context_lens=self.lens[:size])
        return AttentionMetadata(slot_mapping=self.slots[:size], prefills=[], num_prefill_tokens=0, decode=decode)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._meta(size), self.kv_caches)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # the largest first: smaller ones fit in its memory pool
            self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)  # [size, hidden]
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end): write to the scratch block's first slot and attend to it alone."""
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = self.scratch_block * self.block_size
        self.tables[start:end, 0] = self.scratch_block
        self.lens[start:end] = 1

    def can_run(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and num_blocks <= self.tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One decode token per sequence (meta from ModelRunner, Triton's decode inputs) -> hidden [B, hidden]."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        tables = meta.decode.block_tables  # [n, width]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :tables.shape[1]].copy_(tables)  # columns past a row's length are never read
        self.lens[:n].copy_(meta.decode.context_lens)
        self._pad(n, size)
        graph, hidden = self.graphs[size]
        graph.replay()
        self.replays += 1
        return hidden[:n]
