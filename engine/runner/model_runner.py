"""Turns a SchedulerOutput into tensors, runs the model, samples: one ModelRunnerOutput back.

The batch's layout is batch.py's; the strategies that do more than sample a token have rooms of
their own: beam candidates (beam_search.py), contrastive choice (contrastive.py), speculative
acceptance and the KV moves of a draft tree (spec_decode.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from engine.core.kv_cache_manager import slot
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.layers.attention import DECODE_BACKENDS, AttentionMetadata
from engine.layers.parallel import RanksOutOfStep
from engine.runner import beam_search, contrastive
from engine.runner.batch import BatchBuilder, PromptRow, SampleRow
from engine.runner.cuda_graphs import DecodeGraphs
from engine.runner.runner_output import ModelRunnerOutput
from engine.runner.sampler import Sampler, SamplingInputs, greedy, logprobs_of
from engine.runner.spec_decode import TO_DRAFT, accepted_path, move_kept_kv

__all__ = ["ModelRunner", "ModelRunnerOutput"]


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
        self.batches = BatchBuilder(model, block_size, device, self.decoder, max_blocks)
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

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.batches.block_tables.release(sched.finished_seq_ids)
        self.sampling_inputs.release(sched.finished_seq_ids)
        self.hidden_states.release(sched.finished_seq_ids)
        if sched.block_copies:
            self._copy_blocks(sched.block_copies)
        to_draft = [s for s in sched.seqs if s.request.draft_token_ids[:1] == [TO_DRAFT]]
        if to_draft:
            self._model_draft(to_draft)
        batch = self.batches.build(sched.seqs)
        meta = batch.meta
        if (self.graphs is not None and meta.num_prefill_tokens == 0
                and self.graphs.can_run(len(batch.input_ids), meta.decode.block_tables.shape[1])):
            hidden = self.graphs.run(batch.input_ids, batch.rope_rows, meta)  # [T, hidden]
        else:
            hidden = self._forward(self.model, batch.input_ids, batch.rope_rows, meta, self.kv_caches)  # [T, hidden]
        if self.mirror_draft:
            self.draft_model(batch.input_ids, batch.positions, meta, self.draft_kv_caches)
        for h in batch.hidden_rows:
            self.hidden_states.write(h.seq_id, h.start, hidden[h.row:h.row + h.n])
        rows = [r.row for r in batch.sample_rows] + [r.row for r in batch.prompt_rows]
        logits = self._logits(self.model, hidden, rows) if rows else None  # [R, V] float32
        out = ModelRunnerOutput()
        if batch.sample_rows:
            self._sample(logits[:len(batch.sample_rows)], batch.sample_rows, out, hidden)
        if batch.prompt_rows:
            self._prompt_logprobs(logits[len(batch.sample_rows):], batch.prompt_rows, out)
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
    def _model_draft(self, seqs: list[ScheduledSeq]) -> None:
        """Fill the sequences' drafts with the draft model's greedy picks, one position at a time,
        writing its keys and values where this step's pass writes them again (the target's first
        layers: the target itself; a draft model of its own: the mirror pass in execute)."""
        for i in range(max(len(s.request.draft_token_ids) for s in seqs)):
            rows = [s for s in seqs if len(s.request.draft_token_ids) > i]
            ids = [s.request.draft_token_ids[i - 1] if i else s.request.token_ids[-1] for s in rows]
            pos = [s.request.num_tokens - 1 + i for s in rows]
            slots = [slot(s.block_ids, p, self.block_size) for s, p in zip(rows, pos)]
            meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefills=[], num_prefill_tokens=0,
                                     decode=self.batches.decode_inputs(rows, [1] * len(rows), [p + 1 for p in pos]))
            hidden = self._forward(self.draft_model, self._tensor(ids), self._tensor(pos), meta,
                                   self.draft_kv_caches)  # [rows, h]
            picks = greedy(self._logits(self.draft_model, hidden, list(range(len(rows))))).tolist()
            for s, tok in zip(rows, picks):
                s.request.draft_token_ids[i] = tok

    def _tensor(self, data) -> torch.Tensor:
        return self.batches.tensor(data)

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
    def _sample(self, logits: torch.Tensor, rows: list[SampleRow],
                out: ModelRunnerOutput, hidden: torch.Tensor) -> None:
        """Beam slots report candidates, contrastive sequences choose by their hidden states, the
        rest sample."""
        kinds: dict[str, list[int]] = {"beam": [], "contrastive": [], "sample": []}
        for i, r in enumerate(rows):
            p = r.seq.request.params
            kinds["beam" if p.use_beam_search else "contrastive" if p.contrastive else "sample"].append(i)
        if kinds["beam"]:
            beam_search.candidates(logits[kinds["beam"]], [rows[i].seq.request for i in kinds["beam"]], out)
        if kinds["contrastive"]:
            contrastive.choose(logits[kinds["contrastive"]], [rows[i] for i in kinds["contrastive"]], hidden,
                               self.hidden_states, out)
        if len(kinds["sample"]) == len(rows):
            self._pick(logits, rows, out)
        elif kinds["sample"]:
            self._pick(logits[kinds["sample"]], [rows[i] for i in kinds["sample"]], out)

    def _pick(self, logits: torch.Tensor, rows: list[SampleRow],
              out: ModelRunnerOutput) -> None:
        """Pick each row's token. A sequence with drafts keeps, from its last token on, the draft
        the target picked itself, as long as there is one (in a tree, the child of the one kept
        before), and the target's pick after the last kept: the tokens plain decoding would give,
        seeded rows included (their numbers go by position)."""
        reqs = [r.seq.request for r in rows]
        md = self.sampling_inputs.build(reqs, [r.drafts for r in rows])
        # (a step that fails is retried request by request: a seeded row then draws the same number)
        tokens, logprobs = self.sampler(logits, md)
        by_seq: dict[str, list[int]] = {}  # seq_id -> its rows, the last token's first
        for i, req in enumerate(reqs):
            by_seq.setdefault(req.seq_id, []).append(i)
        moves: list[tuple[ScheduledSeq, list[int]]] = []
        for seq_rows in by_seq.values():
            s = rows[seq_rows[0]].seq
            req = s.request
            path = accepted_path(req, [tokens[i] for i in seq_rows])  # drafts kept, in order
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

    def _move_kept_kv(self, moves: list[tuple[ScheduledSeq, list[int]]]) -> None:
        move_kept_kv(self.kv_caches, moves, self.block_size)

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[PromptRow], out: ModelRunnerOutput) -> None:
        # the logits at position p score prompt token p + 1
        targets = self._tensor([r.seq.request.token_ids[r.position + 1] for r in rows])
        nums = [r.seq.request.params.prompt_logprobs for r in rows]
        lps = logprobs_of(logits.log_softmax(dim=-1), targets, nums)
        for r, lp in zip(rows, lps):
            out.prompt_logprobs.setdefault(r.seq.request.seq_id, (r.position + 1, []))[1].append(lp)
