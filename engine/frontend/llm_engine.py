"""The synchronous engine: add requests, then step = schedule -> run -> postprocess."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import platform
from engine.core.beam import BeamGroup, Hypothesis
from engine.core.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.outputs import CompletionOutput, RequestOutput
from engine.core.request import Request, TokenLogprobs
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from engine.frontend.detokenizer import IncrementalDetokenizer, SequenceText
from engine.frontend.metrics import EngineMetrics
from engine.layers.parallel import SINGLE, RanksOutOfStep, TensorParallel
from engine.models.llama import head_dim
from engine.models.loader import (
    build_model,
    eos_token_ids,
    load_hf_config,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_source,
)
from engine.runner import contrastive, tp_worker
from engine.runner.grammar import Grammars
from engine.runner.lookahead import LookaheadProposer
from engine.runner.model_runner import ModelRunner, ModelRunnerOutput, ModelSpec
from engine.runner.spec_decode import NgramProposer, SelfDraftProposer

logger = logging.getLogger(__name__)
PROPOSERS = {"ngram": NgramProposer, "lookahead": LookaheadProposer, "draft_model": SelfDraftProposer}


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for cannot fit the model's context."""


class DeviceFaultError(RuntimeError):
    """The device failed in a way no request can be served after (a lost or corrupted CUDA context)."""


@dataclass
class _Sent:
    """What earlier outputs of one choice handed out (output_kind "delta")."""

    tokens: int = 0  # output tokens (and their logprobs)
    cumulative_logprob: float = 0.0


@dataclass
class _RequestState:
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    texts: list[SequenceText]
    sent: list[_Sent]
    error: str | None = None  # why serving it failed (finish_reason "error")
    # [None, then one entry per prompt token after the first] while the first choice scores them
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config.validate()
        src = resolve_source(config.model)
        self.model_name = config.served_model_name or src.name
        self.hf_config = load_hf_config(src)
        self.tokenizer = load_tokenizer(src, config.tokenizer)
        # The step loop decodes with its own copy: a Rust tokenizer used from two threads at
        # once raises "Already borrowed", and the front end encodes prompts on its own thread.
        self._detok_tokenizer = copy.deepcopy(self.tokenizer)
        self.eos_token_ids = eos_token_ids(src, self.hf_config, self.tokenizer)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = self._max_model_len()
        # No token spells more than this many characters, so a longer prompt cannot fit the
        # context: it is refused before tokenizing it (which takes seconds for megabytes).
        # Twice the bound, for normalisers that merge characters.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 2 * longest * self.max_model_len
        torch.manual_seed(config.seed)
        # tensor parallelism: this process is rank 0; its shapes are a rank's share
        self.tp = TensorParallel(0, config.tensor_parallel_size)
        self.backends = platform.choose(config, self.device, self.dtype, _attention_shape(self.hf_config, self.tp),
                                        src.gguf_origin is not None)
        spec = config.speculative_config
        # a draft model of its own: loaded before the pool is sized, which holds its KV too
        self._draft = self._load_draft_model(spec.model) if spec and spec.method == "draft_model" \
            and spec.model != "self" else None
        self.num_kv_blocks = self._num_kv_blocks()
        self._ranks: tp_worker.Ranks | None = None  # ranks 1 .. size - 1
        self._finalizer: weakref.finalize | None = None  # stops them (close(), or when the engine is collected)
        model_spec = ModelSpec(src, self.hf_config, self.max_model_len, self.dtype, config.load_format, self.backends,
                               self.num_kv_blocks, config.block_size, config.seed)
        if self.tp.size > 1:
            self._start_ranks(model_spec)
        model = model_spec.build_model(self.device, self.tp)
        # a block's KV under longrope depends on the length of the sequence that computed it (the short
        # or the long factors), which the prefix cache's keys do not hold: no prefix caching there
        prefix_caching = config.enable_prefix_caching and model.long_rope_from is None
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: longrope's KV depends on the sequence's length")
        self.kv = KVCacheManager(self.num_kv_blocks, config.block_size, prefix_caching, self._kv_window(model))
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_prefill_tokens_while_decoding, model.long_rope_from,
                                   config.scheduling_policy)
        graphs = self.backends.cuda_graphs and model.capturable and self.tp.size == 1
        self.runner = model_spec.build_runner(model, self.device, config.max_num_seqs if graphs else 0)
        self.runner.channel = self._ranks and self._ranks.channel
        if self._ranks is not None:
            self._ranks.channel.all_built()
        self._requests: dict[str, _RequestState] = {}
        self._failed: list[RequestOutput] = []  # outputs of requests failed during the current step
        self.metrics = EngineMetrics(self.model_name, self.scheduler, self.kv, config.speculative_config is not None)
        self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        self.proposer = None if spec is None else PROPOSERS[spec.method](spec, self.max_model_len)
        if self._draft is not None:
            self.runner.use_draft_model(self._draft[0], self.num_kv_blocks + int(self.runner.graphs is not None))
        elif spec is not None and spec.method == "draft_model":
            self._use_draft_layers(spec.num_layers)

    # --- configuration ------------------------------------------------------------------
    def _use_draft_layers(self, num_layers: int) -> None:
        layers = self.hf_config.num_hidden_layers
        if num_layers >= layers:
            raise ValueError(f"speculative_config.num_layers: must be below the model's {layers} layers "
                             f"(got {num_layers})")
        self.runner.use_draft_layers(num_layers)

    def _load_draft_model(self, name: str) -> tuple[torch.nn.Module, object]:
        """(the draft model, its HF config); it must have the target's tokenizer."""
        src = resolve_source(name)
        cfg = load_hf_config(src)
        same_vocab = cfg.vocab_size == self.hf_config.vocab_size
        if not same_vocab or load_tokenizer(src, None).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"speculative_config.model: {name} does not have the target's tokenizer")
        backends = platform.choose(self.config, self.device, self.dtype, _attention_shape(cfg),
                                   src.gguf_origin is not None)
        if backends.attention != self.backends.attention:
            raise ValueError(f"speculative_config.model: its attention shape needs the {backends.attention!r} decode "
                             f"kernel, the target's runs {self.backends.attention!r}: give --attention-backend torch")
        return build_model(src, cfg, self.max_model_len, self.dtype, self.device, self.config.load_format,
                           backends), cfg

    def _start_ranks(self, spec: ModelSpec) -> None:
        """Check the model splits over the ranks, start ranks 1 .., and join them as rank 0."""
        if dist.is_initialized():  # (torch.distributed has one default process group a process)
            raise RuntimeError("tensor_parallel_size: another engine's ranks are running in this process; "
                               "close() it first")
        self.tp.share(self.hf_config.intermediate_size, "intermediate_size")  # (heads: checked by the shape)
        self.tp, self._ranks = tp_worker.start(self.tp.size, self.device.type, self.config.tensor_parallel_timeout,
                                               spec)
        self._finalizer = weakref.finalize(self, self._ranks.stop)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do without them); the engine runs no more steps."""
        if self._finalizer is not None:
            self._finalizer()

    def _kv_window(self, model: torch.nn.Module) -> int | None:
        """The positions every layer attends to (None: all of them), of a draft model of its own too:
        it reads the same block tables."""
        windows = [model.kv_window] + ([self._draft[0].kv_window] if self._draft is not None else [])
        return None if None in windows else max(windows)

    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise ValueError(f"max_model_len: {asked} exceeds the model's limit of {limit} tokens")
        return asked or limit

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = ModelRunner.kv_bytes_per_block(self.hf_config, self.config.block_size, self.dtype,
                                                   _attention_shape(self.hf_config, self.tp)[1])
        if self._draft is not None:  # the draft model's pool has as many blocks
            per_block += ModelRunner.kv_bytes_per_block(self._draft[1], self.config.block_size, self.dtype)
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - self.config.gpu_memory_utilization))
        if budget is None:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        blocks = budget // per_block
        if blocks < 1:
            raise ValueError(f"the KV-cache budget of {budget} bytes holds no block of {per_block} bytes")
        return blocks

    # --- requests -----------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     checked: bool = False, priority: int = 0) -> tuple[_RequestState, list[Request]]:
        """Tokenize and validate without touching the scheduler (safe from another thread).
        `checked`: the prompt is token ids that prepare_prompt returned for these params;
        `priority`: under the priority scheduling policy, lower is served first."""
        params = params or SamplingParams()
        self.check_priority(priority)
        text = prompt if isinstance(prompt, str) else None
        ids = list(prompt) if checked else self.prepare_prompt(prompt, params)
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        banned = tuple(sorted(self.eos_token_ids | set(params.stop_token_ids)))
        if params.use_beam_search:
            state, seqs = self._beam_request(request_id, text, ids, params, max_tokens, banned)
            seqs[0].priority = priority
            return state, seqs
        seqs = []
        for i in range(params.n):
            # only the first choice scores the prompt; the others share its KV blocks
            p = params if i == 0 or params.prompt_logprobs is None else dataclasses.replace(
                params, prompt_logprobs=None)
            grammar = None if params.structured_outputs is None else self.grammars.matcher(params.structured_outputs)
            seqs.append(Request(request_id, i, ids, p, max_tokens, min_tokens_banned=banned, grammar=grammar,
                                bad_words_ids=self._bad_words_ids(params)))
        seqs[0].priority = priority  # (the scheduler gives the request's other sequences the same)
        texts = [self._sequence_text(ids, params) for _ in seqs]
        return _RequestState(text, ids, seqs, texts, [_Sent() for _ in seqs]), seqs

    def check_priority(self, priority: int) -> None:
        if not (isinstance(priority, int) and not isinstance(priority, bool) and -(1 << 63) <= priority < 1 << 63):
            raise ValueError(f"priority: must be a 64-bit integer (got {priority!r})")
        if priority and self.config.scheduling_policy != "priority":
            raise ValueError("priority: needs the priority scheduling policy (--scheduling-policy priority); "
                             "under fcfs every request is served in arrival order")

    def _sequence_text(self, prompt_ids: list[int], params: SamplingParams) -> SequenceText:
        detokenizer = IncrementalDetokenizer(self._detok_tokenizer, prompt_ids, params.skip_special_tokens,
                                             params.spaces_between_special_tokens)
        return SequenceText(detokenizer, params.stop_strings, params.include_stop_str_in_output)

    def _bad_words_ids(self, params: SamplingParams) -> tuple[tuple[int, ...], ...]:
        """Each bad word's tokens, and (as vLLM) those after a space where that spells the word
        with as many tokens, the first another: how it reads within the text."""
        seqs: list[tuple[int, ...]] = []
        for word in params.bad_words or ():
            alone = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            seqs += [alone] if alone not in seqs else []
            if len(spaced) == len(alone) and spaced[0] != alone[0] and spaced not in seqs:
                seqs.append(spaced)
        return tuple(seqs)

    def _beam_request(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams,
                      max_tokens: int, banned: tuple[int, ...]) -> tuple[_RequestState, list[Request]]:
        """A beam search: one slot (sequence) per beam, all in one BeamGroup."""
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        group = BeamGroup(params.beam_width, params.n, params.length_penalty, params.early_stopping,
                          max_tokens, frozenset(stops))
        seqs = [Request(request_id, i, ids, params if i == 0 else dataclasses.replace(params, prompt_logprobs=None),
                        max_tokens, min_tokens_banned=banned, beam=group) for i in range(group.width)]
        return _RequestState(text, ids, seqs, [], []), seqs

    def prepare_prompt(self, prompt: str | list[int], params: SamplingParams, tokenizer=None,
                       add_special_tokens: bool = True) -> list[int]:
        """Token ids of the prompt, checked against the vocabulary, context and pool (ValueError).

        `tokenizer`: a copy of self.tokenizer, for callers on a thread of their own;
        `add_special_tokens`: whether a text prompt gets the tokenizer's BOS and the like."""
        self._check_params(params)
        keep = params.truncate_prompt_tokens
        keep = self.max_model_len if keep == -1 else keep
        if isinstance(prompt, str):
            if keep is None:  # (a prompt to be cut may be longer: the body limit bounds it)
                self.check_prompt_chars(len(prompt))
            ids = (tokenizer or self.tokenizer).encode(prompt, add_special_tokens=add_special_tokens)
        else:
            if keep is None and len(prompt) > self.max_model_len:  # before looking at each id
                raise self._too_long(len(prompt), params.max_tokens or 1)
            ids = list(prompt)
        ids = ids[-keep:] if keep is not None else ids
        self._check_prompt(ids, params)
        return ids

    def check_prompt_chars(self, num_chars: int) -> None:
        """ContextLengthError if a text this long cannot fit the context as tokens of any kind."""
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{num_chars} characters, more than any {self.max_model_len} tokens of its vocabulary spell. "
                "Please reduce the length of the prompt.")

    def _too_long(self, num_prompt: int, num_completion: int) -> ContextLengthError:
        wanted = num_prompt + num_completion
        return ContextLengthError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
            f"{wanted} tokens ({num_prompt} in the prompt, {num_completion} in the completion). "
            "Please reduce the length of the prompt or the completion.")

    def _check_params(self, params: SamplingParams) -> None:
        """The bounds SamplingParams.validate cannot check alone: those set by the vocabulary."""
        vocab = self.hf_config.vocab_size

        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {why}")

        need(params.top_k <= vocab, "top_k", f"must be at most the vocabulary size, {vocab}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            need(value is None or value <= vocab, name, f"must be at most the vocabulary size, {vocab}")
        need(all(t < vocab for t in params.stop_token_ids), "stop_token_ids", f"token ids must be in [0, {vocab})")
        need(all(0 <= t < vocab for t in params.logit_bias or ()), "logit_bias",
             f"keys must be token ids in [0, {vocab})")
        need(all(t < vocab for t in params.allowed_token_ids or ()), "allowed_token_ids",
             f"token ids must be in [0, {vocab})")
        # a beam group runs all its beams at once: a wider one could never start
        need(not params.use_beam_search or params.beam_width <= self.config.max_num_seqs, "best_of",
             f"the beam width must be at most max_num_seqs, {self.config.max_num_seqs}")

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        if len(ids) + (params.max_tokens or 1) > self.max_model_len:
            raise self._too_long(len(ids), params.max_tokens or 1)
        new = params.max_tokens or self.max_model_len - len(ids)
        need = self.kv.num_blocks_for(len(ids) + new)
        if params.use_beam_search:  # the prompt's blocks shared, each beam's own after them (at most)
            need = self.kv.num_blocks_for(len(ids)) + params.beam_width * (self.kv.num_blocks_for(new) + 1)
        if self.kv.window is not None:  # at most the window and a step's tokens are held, in every beam
            held = self.kv.num_blocks_for(self.kv.window + self.config.max_num_batched_tokens) + 1
            need = min(need, held * (params.beam_width if params.use_beam_search else 1))
        if need > self.num_kv_blocks:
            raise ContextLengthError(
                f"This request needs {need} KV-cache blocks but the pool has only {self.num_kv_blocks}; "
                "reduce the prompt or max_tokens, or start the server with a larger KV cache.")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        state, _ = self.make_request(request_id, prompt, params, priority=priority)
        self.submit(request_id, state)

    def submit(self, request_id: str, state: _RequestState) -> None:
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        self._requests[request_id] = state
        self.scheduler.add(state.seqs)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; None (and no harm) if it is unknown or done."""
        return self._end(request_id, "abort")

    def _end(self, request_id: str, reason: str) -> RequestOutput | None:
        state = self._requests.get(request_id)
        if state is None:
            return None
        for req in self.scheduler.abort(request_id, reason):
            if reason != "error" and state.texts:  # after a fault the text may be mid-way through an update
                state.texts[req.index].finish()
        return self._output(request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        """Serving this request raised: it alone ends, with finish_reason "error", and frees its blocks."""
        if _is_device_fault(error):
            raise DeviceFaultError(f"the device failed: {error}") from error
        logger.error("request %s failed: %s", request_id, error, exc_info=error)
        state = self._requests.get(request_id)
        if state is not None and state.error is None:
            state.error = f"{type(error).__name__}: {error}"
            self._failed.append(self._end(request_id, "error"))

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # --- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running)
        contrastive.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.monotonic()
        for s in sched.seqs:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        self._failed = []
        result = self._execute(sched)
        sched.seqs = [s for s in sched.seqs if not s.request.is_finished]  # drop the failed ones
        drafted = [s for s in sched.seqs if not s.request.params.contrastive]  # (its candidates are no drafts)
        self.metrics.on_drafts(drafted, result)
        if self.proposer is not None:
            self.proposer.record(drafted, result)
        self.scheduler.update_after_step(sched, result.num_rejected)
        touched: dict[str, None] = {}  # requests with a new token, in step order
        generated = 0
        for s in sched.seqs:
            if s.request.is_finished:  # a sibling's postprocessing failed and ended the request
                continue
            try:
                generated += self._postprocess(s.request, result)
            except Exception as e:  # noqa: BLE001 - e.g. a detokenizer fault: this request only
                self._fail(s.request.request_id, e)
                continue
            if (s.request.seq_id in result.sampled or s.request.beam is not None) and _reports(s.request):
                touched[s.request.request_id] = None
        self.metrics.on_step(sched.num_batched_tokens, len(sched.preempted), generated)
        outputs = (self._output(rid) for rid in touched if rid in self._requests)
        return self._failed + [out for out in outputs if out is not None]

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step; if it raises, run each request's part alone so that only the requests
        that fail alone are failed, and the rest get the tokens the whole step would have given."""
        try:
            return self.runner.execute(sched)
        except Exception as e:
            if _is_device_fault(e):
                raise DeviceFaultError(f"the device failed: {e}") from e
            logger.warning("a step of %d sequences failed (%s); retrying each request alone", len(sched.seqs), e)
        merged = ModelRunnerOutput()
        groups: dict[str, list[ScheduledSeq]] = {}
        for s in sched.seqs:
            groups.setdefault(s.request.request_id, []).append(s)
        for request_id, seqs in groups.items():
            try:
                part = self.runner.execute(SchedulerOutput(seqs=seqs))
            except Exception as e:  # noqa: BLE001 - this request's own fault
                self._fail(request_id, e)
                continue
            merged.sampled.update(part.sampled)
            merged.logprobs.update(part.logprobs)
            merged.prompt_logprobs.update(part.prompt_logprobs)
            merged.num_rejected.update(part.num_rejected)
            merged.tree_picks.update(part.tree_picks)
            merged.beam_candidates.update(part.beam_candidates)
            merged.contrastive.update(part.contrastive)
        return merged

    def _postprocess(self, req: Request, result: ModelRunnerOutput) -> int:
        """Apply one step's result to req; the number of tokens it gained (those after a stop are dropped)."""
        state = self._requests[req.request_id]
        if req.seq_id in result.prompt_logprobs:
            first, entries = result.prompt_logprobs[req.seq_id]
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None]
            have = state.prompt_logprobs
            assert first <= len(have), f"prompt logprobs from token {first}, {len(have)} scored so far"
            have += entries[len(have) - first:]  # tokens scored again after a preemption are kept once
        if req.beam is not None:
            cands = result.beam_candidates.get(req.seq_id)
            return 0 if cands is None else self._beam_report(req, state, cands)
        if req.seq_id in result.contrastive:
            req.contrastive_next = result.contrastive[req.seq_id]
        logprobs = result.logprobs.get(req.seq_id)
        tokens = result.sampled.get(req.seq_id, ())  # none: a prefill chunk mid-prompt
        for i, token in enumerate(tokens):
            if self._add_token(req, state, token, None if logprobs is None else logprobs[i]):
                return i + 1
        return len(tokens)

    def _beam_report(self, req: Request, state: _RequestState, cands) -> int:
        """A beam slot's continuations; once every slot of its group has reported, the group's step:
        the next beams (the number of tokens they gained), or the end of the search."""
        group = req.beam
        group.report(req.index, cands)
        if not group.ready:
            return 0
        slots = state.seqs
        stop_string = self._beam_stop_strings(slots) if req.params.stop_strings else None
        moves = group.step([s.output_token_ids for s in slots], [s.logprobs for s in slots], stop_string)
        if group.done:
            best = group.finished[0] if group.finished else None
            for s in slots:
                self.scheduler.finish(s, best.finish_reason if best else "length", best.stop_reason if best else None)
            return len(group.running_slots)
        self.scheduler.move_beams(slots, moves)
        now = time.monotonic()
        self.metrics.on_token(slots[0], now)
        slots[0].last_token_time = now
        return len(moves)

    def _beam_stop_strings(self, slots: list[Request]):
        """For a beam step: (slot, token) -> the stop string the token completes after the slot's
        output text (past min_tokens), as the sequence's text would find it."""
        params = slots[0].params
        longest = max(map(len, params.stop_strings))
        window = 4 * longest + 8  # output tokens enough to spell the longest stop string (bytes) and more

        def check(slot: int, token: int) -> str | None:
            tokens = slots[slot].output_token_ids
            if len(tokens) + 1 < params.min_tokens:
                return None
            tail = tokens[-window:]
            before = self._detok_tokenizer.decode(tail, skip_special_tokens=params.skip_special_tokens)
            after = self._detok_tokenizer.decode(tail + [token], skip_special_tokens=params.skip_special_tokens)
            hits = [(i, s) for s in params.stop_strings if (i := after.find(s, max(0, len(before) - len(s) + 1))) >= 0]
            return min(hits)[1] if hits else None
        return check

    def _add_token(self, req: Request, state: _RequestState, token: int, logprobs: TokenLogprobs | None) -> bool:
        """Append one generated token and check the stop rules; True when req has finished."""
        req.append_token(token)
        if req.grammar is not None and not req.grammar.accept_token(token):  # the mask rules this out
            raise RuntimeError(f"token {token} is outside the request's grammar")
        now = time.monotonic()
        self.metrics.on_token(req, now)
        req.last_token_time = now
        if logprobs is not None:
            req.logprobs.append(logprobs)
        text = state.texts[req.index]
        past_min = req.num_output_tokens >= req.params.min_tokens
        stop_string = text.append(token, check_stops=past_min)
        reason = self._stop_reason(req, token, past_min, stop_string)
        if reason is not None:
            if stop_string is None:
                text.finish()
            self.scheduler.finish(req, *reason)
        return reason is not None

    def _stop_reason(self, req: Request, token: int, past_min: bool,
                     stop_string: str | None) -> tuple[str, int | str | None] | None:
        p = req.params
        if stop_string is not None:
            return "stop", stop_string
        if req.grammar is not None and req.grammar.is_terminated():  # the output is complete
            return "stop", None
        if past_min and token in p.stop_token_ids:
            return "stop", token
        if past_min and not p.ignore_eos and token in self.eos_token_ids:
            return "stop", None
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def _output(self, request_id: str) -> RequestOutput | None:
        """The request's output as its output_kind asks; None for a "final" one still running
        (a sibling choice finished this step)."""
        state = self._requests[request_id]
        finished = all(s.is_finished for s in state.seqs)
        if state.seqs[0].beam is not None:
            return self._beam_output(request_id, state) if finished else None
        kind = state.seqs[0].params.output_kind
        if kind == "final" and not finished:
            return None
        if finished:
            del self._requests[request_id]
            self.metrics.on_finished(state.seqs)
        if kind == "delta":
            outputs = [self._delta(s, t, sent) for s, t, sent in zip(state.seqs, state.texts, state.sent)]
            prompt_logprobs = None if state.prompt_logprobs_sent else state.prompt_logprobs
            state.prompt_logprobs_sent |= prompt_logprobs is not None
        else:
            outputs = [self._completion(s, t) for s, t in zip(state.seqs, state.texts)]
            prompt_logprobs = state.prompt_logprobs
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outputs, finished,
                             prompt_logprobs, state.seqs[0].num_cached_tokens or 0, state.error)

    def _beam_output(self, request_id: str, state: _RequestState) -> RequestOutput:
        """The n best hypotheses, best first (the whole answer at once, whatever the output kind).
        A search that did not end (aborted, failed) gives its running beams as they were."""
        del self._requests[request_id]
        self.metrics.on_finished(state.seqs)
        first = state.seqs[0]
        group = first.beam
        hyps = group.finished if group.done else [
            Hypothesis(s.output_token_ids, float(score), float(score), s.logprobs, s.finish_reason, None)
            for s, score in zip(state.seqs, group.scores)]
        outputs = []
        for i, hyp in enumerate(hyps[:group.num_return]):
            text = self._sequence_text(state.prompt_token_ids, first.params)
            for j, token in enumerate(hyp.token_ids, 1):  # (a stop string cuts the text where it begins)
                if text.append(token, check_stops=j >= first.params.min_tokens) is not None:
                    break
            else:
                text.finish()
            outputs.append(CompletionOutput(
                index=i, text=text.visible(True), token_ids=list(hyp.token_ids), finish_reason=hyp.finish_reason,
                stop_reason=hyp.stop_reason, logprobs=list(hyp.logprobs) if first.params.logprobs is not None
                else None, cumulative_logprob=hyp.cumulative_logprob, score=hyp.score))
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outputs, True,
                             state.prompt_logprobs, first.num_cached_tokens or 0, state.error)

    @staticmethod
    def _completion(req: Request, text: SequenceText) -> CompletionOutput:
        logprobs: list[TokenLogprobs] | None = list(req.logprobs) if req.params.logprobs is not None else None
        return CompletionOutput(
            index=req.index, text=text.visible(req.is_finished), token_ids=req.output_token_ids,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=logprobs,
            cumulative_logprob=sum(lp.logprob for lp in logprobs) if logprobs is not None else None)

    @staticmethod
    def _delta(req: Request, text: SequenceText, sent: _Sent) -> CompletionOutput:
        """Only what is new since the last output: the cost does not grow with the output."""
        start, end = sent.tokens, req.num_output_tokens
        sent.tokens = end
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = req.logprobs[start:end]
            sent.cumulative_logprob += sum(lp.logprob for lp in logprobs)
        first = req.num_prompt_tokens
        return CompletionOutput(
            index=req.index, text=text.take(req.is_finished), token_ids=req.token_ids[first + start:first + end],
            finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=logprobs,
            cumulative_logprob=sent.cumulative_logprob if logprobs is not None else None)

    # --- introspection ------------------------------------------------------------------
    def describe(self) -> str:
        """The start-up line: model, pool and which kernels run."""
        return platform.describe(self)

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()


def follow_rank_zero(config: EngineConfig) -> bool:
    """Where torchrun started this process as rank 1 or above: run rank 0's steps on this rank's
    shard until it says stop, and say True; elsewhere (rank 0, or no launcher) False at once.
    ValueError where the launcher's world is not tensor_parallel_size (every rank says so at once,
    rather than waiting for ranks that will never come)."""
    launched = tp_worker.launched()
    if launched is not None and launched[1] != config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size: {config.tensor_parallel_size}, but the launcher started "
                         f"{launched[1]} processes (one a rank: give --tensor-parallel-size {launched[1]})")
    if launched is None or launched[0] == 0:
        return False
    tp_worker.run_rank(*launched, "env://", pick_device(config.device).type, config.tensor_parallel_timeout)
    return True


def _attention_shape(hf_config, tp: TensorParallel = SINGLE) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim), as the model builds its attention (a rank's, under
    tensor parallelism)."""
    heads = tp.share(hf_config.num_attention_heads, "num_attention_heads")
    return heads, tp.kv_heads(hf_config.num_attention_heads, hf_config.num_key_value_heads)[1], head_dim(hf_config)


def _reports(req: Request) -> bool:
    """Whether a new token of this sequence makes an output ("final" requests report once, at the end)."""
    return req.is_finished or (req.params.output_kind != "final" and req.beam is None)


def _is_device_fault(error: BaseException) -> bool:
    """A CUDA error leaves the context unusable for every request, and tensor-parallel ranks out of
    step cannot run another, so both end the engine; any other error is taken to be the fault of
    the request being served."""
    accelerator = getattr(torch, "AcceleratorError", ())
    if isinstance(error, (accelerator, RanksOutOfStep)):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)
