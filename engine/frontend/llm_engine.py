"""The synchronous engine: requests in (tokenized, checked), then step = schedule -> execute -> record -> process."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

from engine.core.beam import BeamGroup
from engine.core.config import EngineConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.outputs import RequestOutput
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from engine.frontend.metrics import EngineMetrics
from engine.frontend.output_processor import OutputProcessor, RequestState, reports
from engine.runner import contrastive
from engine.runner.executor import DeviceFaultError, Executor, follow_rank_zero
from engine.runner.grammar import Grammars
from engine.runner.lookahead import LookaheadProposer
from engine.runner.runner_output import ModelRunnerOutput
from engine.runner.spec_decode import NgramProposer, SelfDraftProposer

logger = logging.getLogger(__name__)
PROPOSERS = {"ngram": NgramProposer, "lookahead": LookaheadProposer, "draft_model": SelfDraftProposer}
__all__ = ["ContextLengthError", "DeviceFaultError", "LLMEngine", "follow_rank_zero"]


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for cannot fit the model's context."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config.validate()
        self.executor = ex = Executor(self.config)
        self.model_name, self.hf_config, self.tokenizer = ex.model_name, ex.hf_config, ex.tokenizer
        self.eos_token_ids, self.max_model_len = ex.eos_token_ids, ex.max_model_len
        self.device, self.dtype, self.backends = ex.device, ex.dtype, ex.backends
        self.num_kv_blocks, self.runner = ex.num_kv_blocks, ex.runner
        # No token spells more than this many characters, so a longer prompt cannot fit the
        # context: it is refused before tokenizing it (which takes seconds for megabytes).
        # Twice the bound, for normalisers that merge characters.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 2 * longest * self.max_model_len
        # a block's KV under longrope depends on the length of the sequence that computed it (the short
        # or the long factors), which the prefix cache's keys do not hold: no prefix caching there
        prefix_caching = config.enable_prefix_caching and ex.long_rope_from is None
        if config.enable_prefix_caching and not prefix_caching:
            logger.info("prefix caching is off: longrope's KV depends on the sequence's length")
        self.kv = KVCacheManager(self.num_kv_blocks, config.block_size, prefix_caching, ex.kv_window)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_prefill_tokens_while_decoding, ex.long_rope_from,
                                   config.scheduling_policy)
        self.metrics = EngineMetrics(self.model_name, self.scheduler, self.kv, config.speculative_config is not None)
        # the step loop decodes with a copy of its own (see OutputProcessor)
        self.outputs = OutputProcessor(copy.deepcopy(self.tokenizer), self.eos_token_ids, self.max_model_len,
                                       self.scheduler, self.metrics)
        self._requests = self.outputs.states
        self._failed: list[RequestOutput] = []  # outputs of requests failed during the current step
        self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        spec = config.speculative_config
        self.proposer = None if spec is None else PROPOSERS[spec.method](spec, self.max_model_len)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do without them); the engine runs no more steps."""
        self.executor.close()

    # --- requests -----------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                     checked: bool = False, priority: int = 0) -> tuple[RequestState, list[Request]]:
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
        return self.outputs.new_state(text, ids, seqs), seqs

    def check_priority(self, priority: int) -> None:
        if not (isinstance(priority, int) and not isinstance(priority, bool) and -(1 << 63) <= priority < 1 << 63):
            raise ValueError(f"priority: must be a 64-bit integer (got {priority!r})")
        if priority and self.config.scheduling_policy != "priority":
            raise ValueError("priority: needs the priority scheduling policy (--scheduling-policy priority); "
                             "under fcfs every request is served in arrival order")

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
                      max_tokens: int, banned: tuple[int, ...]) -> tuple[RequestState, list[Request]]:
        """A beam search: one slot (sequence) per beam, all in one BeamGroup."""
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        group = BeamGroup(params.beam_width, params.n, params.length_penalty, params.early_stopping,
                          max_tokens, frozenset(stops))
        seqs = [Request(request_id, i, ids, params if i == 0 else dataclasses.replace(params, prompt_logprobs=None),
                        max_tokens, min_tokens_banned=banned, beam=group) for i in range(group.width)]
        return self.outputs.new_state(text, ids, seqs), seqs

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

    def submit(self, request_id: str, state: RequestState) -> None:
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
        ended = self.scheduler.abort(request_id, reason)
        if reason != "error":  # after a fault the text may be mid-way through an update
            self.outputs.finish_texts(state, ended)
        return self.outputs.output(request_id)

    def _fail(self, request_id: str, error: BaseException) -> None:
        """Serving this request raised: it alone ends, with finish_reason "error", and frees its blocks."""
        if isinstance(error, DeviceFaultError):  # (the executor tells them: the device's, not the request's)
            raise error
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
        sched = self._schedule()
        if sched.is_empty:
            return []
        self._failed = []
        result = self._execute(sched)
        sched.seqs = [s for s in sched.seqs if not s.request.is_finished]  # drop the failed ones
        self._record(sched, result)
        touched, generated = self._process(sched, result)
        self.metrics.on_step(sched.num_batched_tokens, len(sched.preempted), generated)
        outputs = (self.outputs.output(rid) for rid in touched if rid in self._requests)
        return self._failed + [out for out in outputs if out is not None]

    def _schedule(self) -> SchedulerOutput:
        """Drafts and contrastive candidates first: they are scheduled as the sequences' next tokens."""
        if self.proposer is not None:
            self.proposer.propose(self.scheduler.running)
        contrastive.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        now = time.monotonic()
        for s in sched.seqs:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = now
        return sched

    def _record(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """The drafts kept, and each sequence's tokens computed (the rejected drafts' slots rolled back)."""
        drafted = [s for s in sched.seqs if not s.request.params.contrastive]  # (its candidates are no drafts)
        self.metrics.on_drafts(drafted, result)
        if self.proposer is not None:
            self.proposer.record(drafted, result)
        self.scheduler.update_after_step(sched, result.num_rejected)

    def _process(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> tuple[list[str], int]:
        """(the requests with an output to make, in step order; the tokens generated)."""
        touched: dict[str, None] = {}
        generated = 0
        for s in sched.seqs:
            if s.request.is_finished:  # a sibling's processing failed and ended the request
                continue
            try:
                generated += self.outputs.process(s.request, result)
            except Exception as e:  # noqa: BLE001 - e.g. a detokenizer fault: this request only
                self._fail(s.request.request_id, e)
                continue
            if (s.request.seq_id in result.sampled or s.request.beam is not None) and reports(s.request):
                touched[s.request.request_id] = None
        return list(touched), generated

    def _execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step; if it raises, run each request's part alone so that only the requests
        that fail alone are failed, and the rest get the tokens the whole step would have given."""
        try:
            return self.executor.execute(sched)
        except DeviceFaultError:
            raise
        except Exception as e:  # noqa: BLE001 - found out request by request below
            logger.warning("a step of %d sequences failed (%s); retrying each request alone", len(sched.seqs), e)
        merged = ModelRunnerOutput()
        groups: dict[str, list[ScheduledSeq]] = {}
        for s in sched.seqs:
            groups.setdefault(s.request.request_id, []).append(s)
        for request_id, seqs in groups.items():
            try:
                merged.merge(self.executor.execute(SchedulerOutput(seqs=seqs)))
            except Exception as e:  # noqa: BLE001 - this request's own fault
                self._fail(request_id, e)
        return merged

    # --- introspection ------------------------------------------------------------------
    def describe(self) -> str:
        """The start-up line: model, pool and which kernels run."""
        model, kernels = self.executor.describe()
        c = self.config
        return (f"{model} max_num_seqs={c.max_num_seqs} "
                f"prefix_caching={'on' if self.kv.enable_prefix_caching else 'off'} {kernels}")

    def check_invariants(self) -> None:
        self.scheduler.check_invariants()
