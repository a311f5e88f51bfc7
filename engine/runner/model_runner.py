"""Turns a SchedulerOutput into tensors, runs the model, samples: one ModelRunnerOutput back."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.core.beam import Candidates
from engine.core.request import DraftTree, Request, TokenLogprobs
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.layers.attention import DECODE_BACKENDS, AttentionMetadata, DecodeInputs, PrefillSpan
from engine.layers.parallel import SINGLE, RanksOutOfStep, TensorParallel
from engine.models.llama import head_dim
from engine.models.loader import build_model
from engine.runner import contrastive
from engine.runner.cuda_graphs import DecodeGraphs
from engine.runner.sampler import Sampler, SamplingInputs, logprobs_of
from engine.runner.spec_decode import TO_DRAFT


@dataclass
class ModelRunnerOutput:
    # seq_id -> the next token; under speculative decoding the accepted drafts, then the target's
    # own next token (1 to k + 1 tokens)
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token
    # seq_id -> tokens of the step not kept, where it had drafts (their slots are rolled back)
    num_rejected: dict[str, int] = field(default_factory=dict)
    # seq_id -> the target's pick at the last token and at each draft of its tree (lookahead's guesses)
    tree_picks: dict[str, list[int]] = field(default_factory=dict)
    # seq_id -> (index of the first prompt token scored, logprobs of the prompt tokens this step
    # scored, in order); after a preemption the recomputed ones come again
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # seq_id -> a beam slot's best continuations (beam search picks among a group's together)
    beam_candidates: dict[str, Candidates] = field(default_factory=dict)
    # seq_id -> a contrastive sequence's candidates for the token after its last (see contrastive.py)
    contrastive: dict[str, contrastive.ContrastiveCandidates] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """What a ModelRunner is built from: the engine's, and each tensor-parallel rank's (sent to
    them once, when they start)."""

    src: object  # engine.models.loader.ModelSource
    hf_config: object
    max_model_len: int
    dtype: torch.dtype
    load_format: str
    backends: object  # engine.platform.Backends
    num_blocks: int
    block_size: int
    seed: int

    def build_model(self, device: torch.device, tp: TensorParallel = SINGLE) -> torch.nn.Module:
        """The model (this rank's shard under tensor parallelism), on its kernels."""
        return build_model(self.src, self.hf_config, self.max_model_len, self.dtype, device, self.load_format,
                           self.backends, tp)

    def build_runner(self, model: torch.nn.Module, device: torch.device, graph_max_batch: int = 0) -> ModelRunner:
        return ModelRunner(model, self.hf_config, self.num_blocks, self.block_size, device, self.dtype, self.seed,
                           self.backends.attention, graph_max_batch, self.max_model_len)


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    rope_rows: torch.Tensor  # [T] int64: each token's row of the target's RoPE tables (its position, but Phi-3's)
    meta: AttentionMetadata
    # (seq, index in the batch, draft offset j): the logits there pick the token after its last
    # token and its first j drafts (j = 0 without drafts)
    sample_rows: list[tuple[ScheduledSeq, int, int]]
    prompt_rows: list[tuple[ScheduledSeq, int, int]]  # (seq, position, its index in the batch)
    # contrastive sequences: (seq_id, first position, index in the batch, rows) of the positions whose
    # hidden states it keeps (a prefill's tokens; in a candidates step, the last token only)
    hidden_rows: list[tuple[str, int, int, int]] = field(default_factory=list)


def _table_tensor(block_ids: list[int]) -> torch.Tensor:
    """[len] int64. Blocks given back outside a sliding window (NO_BLOCK) read as block 0: every
    path masks those positions (or starts the table past them), so only a valid index is needed."""
    return torch.tensor(block_ids, dtype=torch.int64).clamp_(min=0)


class _BlockTables:
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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, hf_config, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int, decode_backend: str = "torch",
                 graph_max_batch: int = 0, max_model_len: int = 0) -> None:
        """decode_backend: engine/platform.py's choice; graph_max_batch > 0: capture CUDA graphs for
        decode batches up to that size (Triton decode only)."""
        self.model = model
        self.device = device
        self.block_size = block_size
        self.vocab_size = hf_config.vocab_size
        attn = model.layers[0].self_attn
        self.decode_backend = decode_backend
        self.decoder = DECODE_BACKENDS[decode_backend]
        use_graphs = graph_max_batch > 0 and self.decode_backend == "triton"
        # With graphs, one block more than the pool hands out: padding rows of a graph write there.
        shape = (2, num_blocks + int(use_graphs), block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        self.sampling_inputs = SamplingInputs(self.vocab_size, device)
        max_blocks = -(-max_model_len // block_size)
        self.graphs = DecodeGraphs(model, self.kv_caches, graph_max_batch, max_blocks,
                                   scratch_block=num_blocks, block_size=block_size) if use_graphs else None
        self.block_tables = _BlockTables(max_blocks)
        self.hidden_states = contrastive.HiddenStates(hf_config.hidden_size, max_model_len, device)
        # speculative draft_model: the model that drafts and the KV caches it reads and writes:
        # the target's first layers and theirs ("self"), or a model of its own with a pool of its own
        self.draft_model: torch.nn.Module | None = None
        self.draft_kv_caches: list[torch.Tensor] = []
        self.mirror_draft = False  # a draft model of its own also runs each step's tokens: its cache keeps up
        # tensor parallelism, on rank 0: the other ranks are told each forward, logits call and copy
        self.channel = None

    def use_draft_layers(self, num_layers: int) -> None:
        self.draft_model, self.draft_kv_caches = self.model, self.kv_caches[:num_layers]

    def use_draft_model(self, model: torch.nn.Module, num_blocks: int) -> None:
        """A smaller model with the same tokenizer drafts. Its pool has as many blocks as the
        target's and is indexed by the same block tables: a token's keys and values sit in the
        same slot of both, so whatever the scheduler allocates, keeps, rolls back or frees for
        the target, it does for the draft too."""
        attn = model.layers[0].self_attn
        shape = (2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        dtype, device = self.kv_caches[0].dtype, self.kv_caches[0].device
        self.draft_model = model
        self.draft_kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.mirror_draft = True

    @staticmethod
    def kv_bytes_per_block(hf_config, block_size: int, dtype: torch.dtype, kv_heads: int | None = None) -> int:
        """kv_heads: the KV heads of a rank's shard (default: the model's)."""
        kv_heads = kv_heads or hf_config.num_key_value_heads
        per_token = 2 * hf_config.num_hidden_layers * kv_heads * head_dim(hf_config)
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.block_tables.release(sched.finished_seq_ids)
        self.sampling_inputs.release(sched.finished_seq_ids)
        self.hidden_states.release(sched.finished_seq_ids)
        if sched.block_copies:
            self._copy_blocks(sched.block_copies)
        to_draft = [s for s in sched.seqs if s.request.draft_token_ids[:1] == [TO_DRAFT]]
        if to_draft:
            self._model_draft(to_draft)
        batch = self._prepare(sched)
        meta = batch.meta
        if (self.graphs is not None and meta.num_prefill_tokens == 0
                and self.graphs.can_run(len(batch.input_ids), meta.decode.block_tables.shape[1])):
            hidden = self.graphs.run(batch.input_ids, batch.rope_rows, meta)  # [T, hidden]
        else:
            hidden = self._forward(self.model, batch.input_ids, batch.rope_rows, meta, self.kv_caches)  # [T, hidden]
        if self.mirror_draft:
            self.draft_model(batch.input_ids, batch.positions, meta, self.draft_kv_caches)
        for seq_id, start, offset, n in batch.hidden_rows:
            self.hidden_states.write(seq_id, start, hidden[offset:offset + n])
        rows = [i for _, i, _ in batch.sample_rows] + [i for _, _, i in batch.prompt_rows]
        logits = self._logits(self.model, hidden, rows) if rows else None  # [R, V] float32
        out = ModelRunnerOutput()
        if batch.sample_rows:
            self._sample(logits[:len(batch.sample_rows)], batch.sample_rows, out, hidden)
        if batch.prompt_rows:
            self._prompt_logprobs(logits[len(batch.sample_rows):], batch, out)
        return out

    def _forward(self, model: torch.nn.Module, input_ids: torch.Tensor, rope_rows: torch.Tensor,
                 meta: AttentionMetadata, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """model's forward over the layers of kv_caches -> [T, hidden]. The target's (all its layers,
        or the first ones as a self-draft) runs on every tensor-parallel rank; a draft model of its
        own runs whole on rank 0 alone."""
        if self.channel is None or model is not self.model:
            return model(input_ids, rope_rows, meta, kv_caches)
        with self._lockstep():
            self.channel.forward(input_ids, rope_rows, meta, len(kv_caches) if kv_caches is not self.kv_caches else 0)
            return model(input_ids, rope_rows, meta, kv_caches)

    def _logits(self, model: torch.nn.Module, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """[R, V] float32: the logits of hidden's rows (gathered from the ranks, for the target)."""
        if self.channel is None or model is not self.model:
            return model.compute_logits(hidden[rows])
        with self._lockstep():
            self.channel.logits(rows)
            return model.compute_logits(hidden[rows])

    @contextmanager
    def _lockstep(self):
        """A part of the step every tensor-parallel rank runs with rank 0. If it raises on rank 0
        (a rank died or timed out, or rank 0's share failed), the ranks wait at different points
        from then on: no later step could be trusted, so the engine ends (RanksOutOfStep)."""
        if self.channel is None:
            yield
            return
        try:
            yield
        except Exception as e:
            self.channel.in_step = False
            raise RanksOutOfStep(f"a tensor-parallel step failed midway: {e}") from e

    # --- inputs ---------------------------------------------------------------------------
    def _prepare(self, sched: SchedulerOutput) -> _Batch:
        # prefills first, then decodes: one token each, and the drafts after it (checked as decode
        # rows of their own, each seeing the history and the drafts before it: the decode kernels
        # run them, CUDA graphs included, and a step's rows need no attention call per sequence)
        seqs = sorted(sched.seqs, key=self._is_decode)
        ids: list[int] = []
        positions: list[int] = []
        rope_rows: list[int] = []
        slots: list[int] = []
        spans: list[PrefillSpan] = []
        decodes: list[ScheduledSeq] = []
        sample_rows, prompt_rows, hidden_rows = [], [], []
        bs = self.block_size
        for s in seqs:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            offset = len(ids)
            ids += (req.token_ids[start:] + req.draft_token_ids)[:end - start]
            # a token's slot follows the one before; its position too, except in a draft tree
            slots += [s.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            tree = req.draft_tree
            span_positions = range(start, end) if tree is None else [start] + [start + o for o in tree.offsets]
            positions += span_positions
            if self.model.long_rope_from is not None:  # else a token's row is its position
                rope_rows += self.model.rope_rows(span_positions, req.num_tokens)
            if not self._is_decode(s):
                table = None if start == 0 else _table_tensor(s.block_ids).to(self.device)
                if tree is None:
                    spans.append(PrefillSpan(offset, len(ids), end, table))
                else:
                    spans.append(PrefillSpan(offset, len(ids), end, table, self._tree_mask(tree, start),
                                             self._tensor(span_positions)))
            else:
                decodes.append(s)
            if end >= req.num_tokens:  # the last token, and each draft after it (j: how far after)
                last = offset + req.num_tokens - 1 - start
                after = range(1, end - req.num_tokens + 1) if tree is None else tree.offsets
                sample_rows += [(s, last, 0)] + [(s, last + i, j) for i, j in enumerate(after, 1)]
            prompt_rows += [(s, start + j, offset + j) for j in range(self._num_prompt_positions(req, start, end))]
            if req.params.contrastive:
                hidden_rows.append((req.seq_id, start, offset, 1 if tree is not None else end - start))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots), prefills=spans,
            num_prefill_tokens=sum(sp.end - sp.start for sp in spans))
        if decodes:
            self._decode_metadata(decodes, meta)
        positions = self._tensor(positions)
        rows = self._tensor(rope_rows) if self.model.long_rope_from is not None else positions
        return _Batch(self._tensor(ids), positions, rows, meta, sample_rows, prompt_rows, hidden_rows)

    @staticmethod
    def _is_decode(s: ScheduledSeq) -> bool:
        """One token after the computed ones (the sequence's last), and its drafts, if a chain."""
        req = s.request
        return s.num_new_tokens == 1 + len(req.draft_token_ids) and req.num_computed_tokens == req.num_tokens - 1 \
            and req.draft_tree is None

    def _tree_mask(self, tree: DraftTree, history: int) -> torch.Tensor:
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
        return mask.to(self.device)

    def _decode_metadata(self, decodes: list[ScheduledSeq], meta: AttentionMetadata) -> None:
        """One decode row per new token: a sequence's block table, repeated for its drafts, and as
        context the keys up to and including that token."""
        reps = [s.num_new_tokens for s in decodes]
        ctx = [s.request.num_computed_tokens + 1 + j for s in decodes for j in range(s.num_new_tokens)]
        meta.decode = self._decode_inputs(decodes, reps, ctx)

    def _decode_inputs(self, seqs: list[ScheduledSeq], reps: list[int], ctx: list[int]) -> DecodeInputs:
        """reps[i] rows for seqs[i], each with its block table; ctx [R]: keys in context per row."""
        width = max(len(s.block_ids) for s in seqs)
        rows = torch.tensor([self.block_tables.row(s.request.seq_id, s.block_ids) for s in seqs])
        rows = rows.repeat_interleave(torch.tensor(reps))  # [R]
        # [R, width]; past a sequence's own blocks its row holds stale ids, which its context length masks
        tables = self.block_tables.table[rows, :width].to(self.device)
        return self.decoder.prepare(tables, self._tensor(ctx), self.block_size)

    def _model_draft(self, seqs: list[ScheduledSeq]) -> None:
        """Fill the sequences' drafts with the draft model's greedy picks, one position at a time,
        writing its keys and values where this step's pass writes them again (the target's first
        layers: the target itself; a draft model of its own: the mirror pass in execute)."""
        bs = self.block_size
        for i in range(max(len(s.request.draft_token_ids) for s in seqs)):
            rows = [s for s in seqs if len(s.request.draft_token_ids) > i]
            ids = [s.request.draft_token_ids[i - 1] if i else s.request.token_ids[-1] for s in rows]
            pos = [s.request.num_tokens - 1 + i for s in rows]
            slots = [s.block_ids[p // bs] * bs + p % bs for s, p in zip(rows, pos)]
            meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefills=[], num_prefill_tokens=0,
                                     decode=self._decode_inputs(rows, [1] * len(rows), [p + 1 for p in pos]))
            hidden = self._forward(self.draft_model, self._tensor(ids), self._tensor(pos), meta,
                                   self.draft_kv_caches)  # [rows, h]
            picks = self._logits(self.draft_model, hidden, list(range(len(rows)))).argmax(dim=-1).tolist()
            for s, tok in zip(rows, picks):
                s.request.draft_token_ids[i] = tok

    @staticmethod
    def _num_prompt_positions(req: Request, start: int, end: int) -> int:
        """How many positions from `start` on (up to `end`) have logits that score a prompt token."""
        if req.params.prompt_logprobs is None:
            return 0
        return max(0, min(end, req.num_prompt_tokens - 1) - start)

    def _tensor(self, data) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int64, device=self.device)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Forked beams: copy whole blocks (source -> destination) in every layer's cache."""
        src, dst = self._tensor([c[0] for c in copies]), self._tensor([c[1] for c in copies])
        with self._lockstep():
            if self.channel is not None:
                self.channel.copy(src, dst)
            self.copy_blocks(src, dst)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Block src[i]'s KV into block dst[i], in every layer's cache (this rank's shard)."""
        for cache in self.kv_caches + (self.draft_kv_caches if self.mirror_draft else []):
            cache[:, dst] = cache[:, src]  # [2, blocks, block_size, kv_heads, D]

    # --- outputs --------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, rows: list[tuple[ScheduledSeq, int, int]],
                out: ModelRunnerOutput, hidden: torch.Tensor) -> None:
        """Beam slots report candidates, contrastive sequences choose by their hidden states, the
        rest sample."""
        kinds: dict[str, list[int]] = {"beam": [], "contrastive": [], "sample": []}
        for i, (s, _, _) in enumerate(rows):
            p = s.request.params
            kinds["beam" if p.use_beam_search else "contrastive" if p.contrastive else "sample"].append(i)
        if kinds["beam"]:
            self._beam_candidates(logits[kinds["beam"]], [rows[i][0].request for i in kinds["beam"]], out)
        if kinds["contrastive"]:
            self._contrastive(logits[kinds["contrastive"]], [rows[i] for i in kinds["contrastive"]], hidden, out)
        if len(kinds["sample"]) == len(rows):
            self._pick(logits, rows, out)
        elif kinds["sample"]:
            self._pick(logits[kinds["sample"]], [rows[i] for i in kinds["sample"]], out)

    def _contrastive(self, logits: torch.Tensor, rows: list[tuple[ScheduledSeq, int, int]], hidden: torch.Tensor,
                     out: ModelRunnerOutput) -> None:
        """logits [R, V] of contrastive rows: a sequence's last token and, in a candidates step, its
        k candidates after it. Chooses among the candidates, and finds the next step's candidates."""
        by_seq: dict[str, list[int]] = {}
        for i, (s, _, _) in enumerate(rows):
            by_seq.setdefault(s.request.seq_id, []).append(i)
        next_rows, reqs, num_outputs = [], [], []
        for seq_rows in by_seq.values():
            s = rows[seq_rows[0]][0]
            req = s.request
            if len(seq_rows) == 1:  # the last token without candidates: computed again beside them
                out.num_rejected[req.seq_id] = 1
                next_rows.append(seq_rows[0])
                reqs.append(req)
                num_outputs.append(req.num_output_tokens)
                continue
            cands = req.contrastive_next
            context = self.hidden_states.context(req.seq_id, req.num_computed_tokens + 1)  # [L, H]
            branch = [rows[i][1] for i in seq_rows[1:]]
            chosen = contrastive.pick(context, hidden[branch], cands.probs, req.params.penalty_alpha)
            out.sampled[req.seq_id] = [cands.token_ids[chosen]]
            if cands.entries is not None:
                out.logprobs[req.seq_id] = [cands.entries[chosen]]
            out.num_rejected[req.seq_id] = len(branch)  # every branch's slot (the chosen one is the next last token)
            next_rows.append(seq_rows[1 + chosen])
            reqs.append(req)
            num_outputs.append(req.num_output_tokens + 1)
        for req, cands in zip(reqs, contrastive.candidates(logits[next_rows], reqs, num_outputs)):
            out.contrastive[req.seq_id] = cands

    def _beam_candidates(self, logits: torch.Tensor, reqs: list[Request], out: ModelRunnerOutput) -> None:
        """logits [R, V] of beam slots -> each slot's best continuations: log-softmax, then the
        min_tokens ban (transformers applies its processors to the log-probabilities, unnormalised)."""
        lps = logits.float().log_softmax(dim=-1)  # [R, V]
        for i, req in enumerate(reqs):
            if req.num_output_tokens < req.params.min_tokens and req.min_tokens_banned:
                lps[i, list(req.min_tokens_banned)] = float("-inf")
        want = max(max(r.beam.keep, r.params.logprobs or 0) for r in reqs)
        top_lps, top_ids = (t.tolist() for t in lps.topk(min(want, lps.shape[1]), dim=-1))  # [R, want] best first
        for req, ids, values in zip(reqs, top_ids, top_lps):
            keep, n = req.beam.keep, req.params.logprobs
            entries = None if n is None else contrastive.top_entries(ids, values, keep, n)
            out.beam_candidates[req.seq_id] = Candidates(ids[:keep], values[:keep], entries)

    def _pick(self, logits: torch.Tensor, rows: list[tuple[ScheduledSeq, int, int]],
              out: ModelRunnerOutput) -> None:
        """Pick each row's token. A sequence with drafts keeps, from its last token on, the draft
        the target picked itself, as long as there is one (in a tree, the child of the one kept
        before), and the target's pick after the last kept: the tokens plain decoding would give,
        seeded rows included (their numbers go by position)."""
        reqs = [s.request for s, _, _ in rows]
        md = self.sampling_inputs.build(reqs, [j for _, _, j in rows])
        # (a step that fails is retried request by request: a seeded row then draws the same number)
        tokens, logprobs = self.sampler(logits, md)
        by_seq: dict[str, list[int]] = {}  # seq_id -> its rows, the last token's first
        for i, req in enumerate(reqs):
            by_seq.setdefault(req.seq_id, []).append(i)
        moves: list[tuple[ScheduledSeq, list[int]]] = []
        for seq_rows in by_seq.values():
            s = rows[seq_rows[0]][0]
            req = s.request
            path = self._accepted_path(req, [tokens[i] for i in seq_rows])  # drafts kept, in order
            kept = out.sampled[req.seq_id] = [tokens[seq_rows[d + 1]] for d in [-1, *path]]
            if logprobs[seq_rows[0]] is not None:
                out.logprobs[req.seq_id] = [logprobs[seq_rows[d + 1]] for d in [-1, *path]]
            if req.draft_token_ids:
                out.num_rejected[req.seq_id] = s.num_new_tokens - len(kept)
            if req.draft_tree is not None:
                out.tree_picks[req.seq_id] = [tokens[i] for i in seq_rows]
                if path != list(range(len(path))):
                    moves.append((s, path))
        if moves:
            self._move_kept_kv(moves)

    @staticmethod
    def _accepted_path(req: Request, picks: list[int]) -> list[int]:
        """The drafts kept (indices), given the target's pick at the last token and each draft."""
        tree = req.draft_tree
        parents = range(-1, len(req.draft_token_ids) - 1) if tree is None else tree.parents
        path, node = [], -1
        while True:
            pick = picks[node + 1]
            child = next((i for i, p in enumerate(parents) if p == node and req.draft_token_ids[i] == pick), None)
            if child is None:
                return path
            path.append(child)
            node = child

    def _move_kept_kv(self, moves: list[tuple[ScheduledSeq, list[int]]]) -> None:
        """The kept drafts of a tree were computed in slots of their own: copy their keys and
        values to the slots that follow the last token, where the sequence reads them from now on."""
        bs = self.block_size
        src, dst = [], []
        for s, path in moves:
            start = s.request.num_computed_tokens  # the last token's slot
            for k, d in enumerate(path, 1):
                for p, into in ((start + 1 + d, src), (start + k, dst)):
                    into.append(s.block_ids[p // bs] * bs + p % bs)
        src_t, dst_t = self._tensor(src), self._tensor(dst)
        for cache in self.kv_caches:
            flat = cache.view(2, -1, *cache.shape[3:])  # [2, slots, kv_heads, D]
            flat[:, dst_t] = flat[:, src_t]  # (gathered before written: overlaps are safe)

    def _prompt_logprobs(self, logits: torch.Tensor, batch: _Batch, out: ModelRunnerOutput) -> None:
        # the logits at position p score prompt token p + 1
        targets = self._tensor([s.request.token_ids[pos + 1] for s, pos, _ in batch.prompt_rows])
        nums = [s.request.params.prompt_logprobs for s, _, _ in batch.prompt_rows]
        lps = logprobs_of(logits.log_softmax(dim=-1), targets, nums)
        for (s, pos, _), lp in zip(batch.prompt_rows, lps):
            out.prompt_logprobs.setdefault(s.request.seq_id, (pos + 1, []))[1].append(lp)
