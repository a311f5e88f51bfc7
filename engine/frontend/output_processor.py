"""From a step's tokens to what each request hands back: text, stop rules, outputs.

The engine's other half after the runner: each running request's state (its sequences, their
text so far, what earlier outputs handed out), the tokens a step gave appended with their stop
rules checked (stop strings, stop tokens, EOS, the length limit, a grammar's end), beam search's
step once every beam has reported, and the RequestOutput each request's output_kind asks for.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from engine.core.beam import Candidates, Hypothesis
from engine.core.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from engine.core.request import Request
from engine.core.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.frontend.detokenizer import IncrementalDetokenizer, SequenceText
from engine.frontend.metrics import EngineMetrics
from engine.runner.runner_output import ModelRunnerOutput


@dataclass
class Sent:
    """What earlier outputs of one choice handed out (output_kind "delta")."""

    tokens: int = 0  # output tokens (and their logprobs)
    cumulative_logprob: float = 0.0


@dataclass
class RequestState:
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Request]
    texts: list[SequenceText]  # one a choice (none for a beam search: its hypotheses are spelled at the end)
    sent: list[Sent]
    error: str | None = None  # why serving it failed (finish_reason "error")
    # [None, then one entry per prompt token after the first] while the first choice scores them
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, scheduler: Scheduler,
                 metrics: EngineMetrics) -> None:
        """tokenizer: the step loop's own (a Rust tokenizer raises "Already borrowed" when two
        threads use it at once, and the front end encodes prompts on its own thread)."""
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.metrics = metrics
        self.states: dict[str, RequestState] = {}

    def new_state(self, prompt: str | None, ids: list[int], seqs: list[Request]) -> RequestState:
        texts = [] if seqs[0].beam is not None else [self.sequence_text(ids, s.params) for s in seqs]
        return RequestState(prompt, ids, seqs, texts, [Sent() for _ in texts])

    def sequence_text(self, prompt_ids: list[int], params: SamplingParams) -> SequenceText:
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens,
                                             params.spaces_between_special_tokens)
        return SequenceText(detokenizer, params.stop_strings, params.include_stop_str_in_output)

    def finish_texts(self, state: RequestState, seqs: list[Request]) -> None:
        """The sequences ended outside the stop rules (aborted): their texts give out what they held back."""
        for req in seqs if state.texts else ():  # (a beam search has none: spelled at the end)
            state.texts[req.index].finish()

    # --- a step's tokens --------------------------------------------------------------------
    def process(self, req: Request, result: ModelRunnerOutput) -> int:
        """Apply one step's result to req; the number of tokens it gained (those after a stop are dropped)."""
        state = self.states[req.request_id]
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

    def _beam_report(self, req: Request, state: RequestState, cands: Candidates) -> int:
        """A beam slot's continuations; once every slot of its group has reported, the group's step:
        the next beams (the number of tokens they gained), or the end of the search."""
        group = req.beam
        assert group is not None
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
            before = self.tokenizer.decode(tail, skip_special_tokens=params.skip_special_tokens)
            after = self.tokenizer.decode(tail + [token], skip_special_tokens=params.skip_special_tokens)
            hits = [(i, s) for s in params.stop_strings if (i := after.find(s, max(0, len(before) - len(s) + 1))) >= 0]
            return min(hits)[1] if hits else None
        return check

    def _add_token(self, req: Request, state: RequestState, token: int, logprobs: TokenLogprobs | None) -> bool:
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

    # --- outputs ------------------------------------------------------------------------------
    def output(self, request_id: str) -> RequestOutput | None:
        """The request's output as its output_kind asks; None for a "final" one still running
        (a sibling choice finished this step). A finished request's state is dropped."""
        state = self.states[request_id]
        finished = all(s.is_finished for s in state.seqs)
        if state.seqs[0].beam is not None:
            return self._beam_output(request_id, state) if finished else None
        kind = state.seqs[0].params.output_kind
        if kind == "final" and not finished:
            return None
        if finished:
            del self.states[request_id]
            self.metrics.on_finished(state.seqs)
        if kind == "delta":
            outputs = [_delta(s, t, sent) for s, t, sent in zip(state.seqs, state.texts, state.sent)]
            prompt_logprobs = None if state.prompt_logprobs_sent else state.prompt_logprobs
            state.prompt_logprobs_sent |= prompt_logprobs is not None
        else:
            outputs = [_completion(s, t) for s, t in zip(state.seqs, state.texts)]
            prompt_logprobs = state.prompt_logprobs
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outputs, finished,
                             prompt_logprobs, state.seqs[0].num_cached_tokens or 0, state.error)

    def _beam_output(self, request_id: str, state: RequestState) -> RequestOutput:
        """The n best hypotheses, best first (the whole answer at once, whatever the output kind).
        A search that did not end (aborted, failed) gives its running beams as they were."""
        del self.states[request_id]
        self.metrics.on_finished(state.seqs)
        first = state.seqs[0]
        group = first.beam
        assert group is not None
        hyps = group.finished if group.done else [
            Hypothesis(s.output_token_ids, float(score), float(score), s.logprobs, s.finish_reason, None)
            for s, score in zip(state.seqs, group.scores)]
        outputs = []
        for i, hyp in enumerate(hyps[:group.num_return]):
            text = self.sequence_text(state.prompt_token_ids, first.params)
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


def reports(req: Request) -> bool:
    """Whether a new token of this sequence makes an output ("final" requests report once, at the end)."""
    return req.is_finished or (req.params.output_kind != "final" and req.beam is None)


def _completion(req: Request, text: SequenceText) -> CompletionOutput:
    logprobs: list[TokenLogprobs] | None = list(req.logprobs) if req.params.logprobs is not None else None
    return CompletionOutput(
        index=req.index, text=text.visible(req.is_finished), token_ids=req.output_token_ids,
        finish_reason=req.finish_reason, stop_reason=req.stop_reason, logprobs=logprobs,
        cumulative_logprob=sum(lp.logprob for lp in logprobs) if logprobs is not None else None)


def _delta(req: Request, text: SequenceText, sent: Sent) -> CompletionOutput:
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
