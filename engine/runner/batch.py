"""One step's tokens laid out for the forward pass, and the rows whose outputs are read back.

Prefills come first, then decodes: one token each, and the drafts after it (checked as decode
rows of their own, each seeing the history and the drafts before it: the decode kernels run
them, CUDA graphs included, and a step's rows need no attention call per sequence). A draft tree
(lookahead's, contrastive search's candidates) is a prefill span under a mask of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from engine.core.kv_cache_manager import slot
from engine.core.request import DraftTree, Request
from engine.core.scheduler import ScheduledSeq
from engine.layers.attention import AttentionMetadata, DecodeBackend, DecodeInputs, PrefillSpan


class SampleRow(NamedTuple):
    """The logits at batch row `row` pick the token after seq's last token and its first `drafts` drafts."""

    seq: ScheduledSeq
    row: int
    drafts: int


class PromptRow(NamedTuple):
    """The logits at batch row `row` (position `position`) score prompt token position + 1."""

    seq: ScheduledSeq
    position: int
    row: int


class HiddenRows(NamedTuple):
    """A contrastive sequence keeps the hidden states of `n` rows from `row` on (positions from `start`)."""

    seq_id: str
    start: int
    row: int
    n: int


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    rope_rows: torch.Tensor  # [T] int64: each token's row of the target's RoPE tables (its position, but Phi-3's)
    meta: AttentionMetadata
    sample_rows: list[SampleRow]
    prompt_rows: list[PromptRow]
    hidden_rows: list[HiddenRows]


@dataclass
class _Layout:
    """The batch as it is laid out: a value per token, then what each sequence adds."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    rope_rows: list[int] = field(default_factory=list)  # (only for longrope models)
    slots: list[int] = field(default_factory=list)
    spans: list[PrefillSpan] = field(default_factory=list)
    decodes: list[ScheduledSeq] = field(default_factory=list)
    sample_rows: list[SampleRow] = field(default_factory=list)
    prompt_rows: list[PromptRow] = field(default_factory=list)
    hidden_rows: list[HiddenRows] = field(default_factory=list)


class BatchBuilder:
    """Lays out each step's batch; keeps every sequence's block table between steps."""

    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device, decoder: DecodeBackend,
                 max_blocks: int) -> None:
        self.model, self.block_size, self.device, self.decoder = model, block_size, device, decoder
        self.block_tables = BlockTables(max_blocks)

    def tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=self.device)

    def build(self, seqs: list[ScheduledSeq]) -> Batch:
        layout = _Layout()
        for s in sorted(seqs, key=is_decode):
            self._add(layout, s)
        meta = AttentionMetadata(slot_mapping=self.tensor(layout.slots), prefills=layout.spans,
                                 num_prefill_tokens=sum(sp.end - sp.start for sp in layout.spans))
        if layout.decodes:
            meta.decode = self._decode_metadata(layout.decodes)
        positions = self.tensor(layout.positions)
        rows = self.tensor(layout.rope_rows) if self.model.long_rope_from is not None else positions
        return Batch(self.tensor(layout.ids), positions, rows, meta, layout.sample_rows, layout.prompt_rows,
                     layout.hidden_rows)

    def _add(self, layout: _Layout, s: ScheduledSeq) -> None:
        req, start = s.request, s.request.num_computed_tokens
        end = start + s.num_new_tokens
        offset = len(layout.ids)
        layout.ids += (req.token_ids[start:] + req.draft_token_ids)[:end - start]
        # a token's slot follows the one before; its position too, except in a draft tree
        layout.slots += [slot(s.block_ids, p, self.block_size) for p in range(start, end)]
        tree = req.draft_tree
        positions = range(start, end) if tree is None else [start] + [start + o for o in tree.offsets]
        layout.positions += positions
        if self.model.long_rope_from is not None:  # else a token's row is its position
            layout.rope_rows += self.model.rope_rows(positions, req.num_tokens)
        if is_decode(s):
            layout.decodes.append(s)
        else:
            table = None if start == 0 else _table_tensor(s.block_ids).to(self.device)
            mask = None if tree is None else tree_mask(tree, start).to(self.device)
            layout.spans.append(PrefillSpan(offset, len(layout.ids), end, table, mask,
                                            None if tree is None else self.tensor(positions)))
        if end >= req.num_tokens:  # the last token, and each draft after it (j: how far after)
            last = offset + req.num_tokens - 1 - start
            after = range(1, end - req.num_tokens + 1) if tree is None else tree.offsets
            layout.sample_rows += [SampleRow(s, last, 0)] + [SampleRow(s, last + i, j) for i, j in enumerate(after, 1)]
        scored = range(_num_prompt_positions(req, start, end))
        layout.prompt_rows += [PromptRow(s, start + j, offset + j) for j in scored]
        if req.params.contrastive:
            layout.hidden_rows.append(HiddenRows(req.seq_id, start, offset, 1 if tree is not None else end - start))

    def _decode_metadata(self, decodes: list[ScheduledSeq]) -> DecodeInputs:
        """One decode row per new token: a sequence's block table, repeated for its drafts, and as
        context the keys up to and including that token."""
        reps = [s.num_new_tokens for s in decodes]
        ctx = [s.request.num_computed_tokens + 1 + j for s in decodes for j in range(s.num_new_tokens)]
        return self.decode_inputs(decodes, reps, ctx)

    def decode_inputs(self, seqs: list[ScheduledSeq], reps: list[int], ctx: list[int]) -> DecodeInputs:
        """reps[i] rows for seqs[i], each with its block table; ctx [R]: keys in context per row."""
        width = max(len(s.block_ids) for s in seqs)
        rows = torch.tensor([self.block_tables.row(s.request.seq_id, s.block_ids) for s in seqs])
        if len(reps) != len(ctx):  # a sequence with drafts: a row for each (~50 us a step otherwise)
            rows = rows.repeat_interleave(torch.tensor(reps))  # [R]
        # [R, width]; past a sequence's own blocks its row holds stale ids, which its context length masks
        tables = self.block_tables.table[rows, :width].to(self.device)
        return self.decoder.prepare(tables, self.tensor(ctx), self.block_size)


def is_decode(s: ScheduledSeq) -> bool:
    """One token after the computed ones (the sequence's last), and its drafts, if a chain."""
    req = s.request
    return s.num_new_tokens == 1 + len(req.draft_token_ids) and req.num_computed_tokens == req.num_tokens - 1 \
        and req.draft_tree is None


def tree_mask(tree: DraftTree, history: int) -> torch.Tensor:
    """[1 + drafts, history + 1 + drafts] bool: the last token and each draft see the history,
    the last token, themselves and the drafts the tree names."""
    n = 1 + len(tree.offsets)
    mask = torch.zeros(n, history + n, dtype=torch.bool)
    mask[:, :history + 1] = True
    mask[0, history + 1:] = False
    rows = [i + 1 for i, seen in enumerate(tree.sees) for _ in seen]
    cols = [history + 1 + j for seen in tree.sees for j in seen]
    mask[rows, cols] = True
    mask[range(n), range(history, history + n)] = True
    return mask


def _num_prompt_positions(req: Request, start: int, end: int) -> int:
    """How many positions from `start` on (up to `end`) have logits that score a prompt token."""
    if req.params.prompt_logprobs is None:
        return 0
    return max(0, min(end, req.num_prompt_tokens - 1) - start)


def _table_tensor(block_ids: list[int]) -> torch.Tensor:
    """[len] int64. Blocks given back outside a sliding window (NO_BLOCK) read as block 0: every
    path masks those positions (or starts the table past them), so only a valid index is needed."""
    return torch.tensor(block_ids, dtype=torch.int64).clamp_(min=0)


class BlockTables:
    """Every sequence's block table as a row of one CPU tensor, kept between steps: a step writes
    only the blocks added since the last one, so building a decode batch's tables does not grow
    with the outputs' length (a fresh tensor from the block lists did)."""

    def __init__(self, max_blocks: int) -> None:
        self.table = torch.zeros(64, max_blocks, dtype=torch.int64)  # [rows, max_blocks]
        self.rows: dict[str, tuple[int, list[int], int]] = {}  # seq_id -> (row, its block list, entries written)
        self.free_rows: list[int] = []

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            entry = self.rows.pop(seq_id, None)
            if entry is not None:
                self.free_rows.append(entry[0])

    def row(self, seq_id: str, block_ids: list[int]) -> int:
        """The row of seq_id, brought up to date with block_ids (which only grow while the same list:
        a preempted sequence gets a new one, then the row is rewritten)."""
        entry = self.rows.get(seq_id)
        if entry is None:
            row, seen, done = self.free_rows.pop() if self.free_rows else len(self.rows), None, 0
            if row >= len(self.table):
                self.table = torch.cat([self.table, torch.zeros_like(self.table)])
        else:
            row, seen, done = entry
        if seen is not block_ids or done > len(block_ids):
            done = 0
        if done < len(block_ids):
            self.table[row, done:len(block_ids)] = _table_tensor(block_ids[done:])
        self.rows[seq_id] = (row, block_ids, len(block_ids))
        return row


