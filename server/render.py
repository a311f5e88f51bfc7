"""Engine outputs as OpenAI completions and chat completions: whole answers, and the SSE stream of
chunks (`data: {json}` per chunk, `data: [DONE]` last)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.core.outputs import CompletionOutput, RequestOutput
from server.answer import AnswerStream
from server.errors import APIError
from server.logprobs import (
    TokenIdNames,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    concat,
    num_tokens,
    prompt_logprobs,
)
from server.protocol import SamplingFields
from server.reasoning import ReasoningFormat
from server.serving import Run
from server.tool_calls import ToolFormat

logger = logging.getLogger("kvserve.server")


def sse(obj: dict, event: str | None = None) -> str:
    """One server-sent event; `event` names its type (Responses and Messages streams name theirs)."""
    head = f"event: {event}\n" if event is not None else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(run: Run, prefix: str, render: ChoiceRender, body: SamplingFields):
    """The OpenAI answer of `run`: a completion or chat completion object, or its chunk stream."""
    base = {"id": f"{prefix}-{run.name}", "created": int(time.time()), "model": run.ctx.model_name}
    if body.stream:
        return run.stream(lambda deltas: _chunks(deltas, run, base, render, body))
    finals = await run.whole()
    n = run.params.n
    choices = []
    for i in sorted(finals):
        for c in finals[i].outputs:
            idx = i * n + c.index
            choices.append(render.choice(idx, *render.piece(idx, i, finals[i], c), c.finish_reason))
            if body.prompt_logprobs is not None and not render.chat:  # vLLM's: on each choice
                choices[-1]["prompt_logprobs"] = render.prompt_logprobs(i, finals[i])
    logger.info("request %s: finished %s", run.request_id, [c["finish_reason"] for c in choices])
    answer = {**base, "object": render.object, "choices": choices, "usage": render.usage(finals.values())}
    if body.prompt_logprobs is not None and render.chat:  # vLLM's: on the answer
        answer["prompt_logprobs"] = render.prompt_logprobs(0, finals[0])
    return answer


async def _chunks(deltas, run: Run, base: dict, render: ChoiceRender, body: SamplingFields) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    chunk = {**base, "object": render.chunk_object}
    n = run.params.n

    def event(choices: list[dict]) -> str:
        if body.continuous_usage:  # vLLM's continuous_usage_stats: the usage so far in every chunk
            return sse({**chunk, "choices": choices, "usage": render.usage(finals.values())})
        return sse({**chunk, "choices": choices})

    try:
        if render.chat:  # chat streams open with the role, once per choice
            for i in range(len(run.prompts) * n):
                yield event([render.delta(i, None, None, None, first=True)])
        async for i, out in deltas:
            finals[i] = out
            for c in out.outputs:
                idx = i * n + c.index
                choice = render.update(idx, i, out, c)
                if choice is not None:
                    yield event([choice])
        if body.include_usage:
            yield sse({**chunk, "choices": [], "usage": render.usage(finals.values())})
    except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
        yield sse(APIError(500, f"engine failure: {e}", type_="internal_server_error").body())
    yield "data: [DONE]\n\n"


@dataclass
class _Sent:
    """How much of one choice has been rendered so far."""

    started: bool = False
    tokens: int = 0
    offset: int = 0  # text_offset of the next token (completions logprobs)
    finished: bool = False


class ChoiceRender:
    """Engine outputs -> OpenAI choices. One code path renders a whole answer (one call per choice,
    on the engine's final output) and a stream (one call per update, on the engine's deltas), so the
    two agree. With `reasoning` (a reasoning parser), a chat answer's thinking segment becomes
    `reasoning_content` (where the request thinks). With `tools` (the format of the model's tool
    calls), the answer after it goes through a tool-call parser: the calls become `tool_calls`, the
    rest `content`."""

    def __init__(self, chat: bool, texts: TokenText | None, prompts: list[list[int]],
                 echo: list[str] | None = None, prompt_only: bool = False, tools: ToolFormat | None = None,
                 reasoning: ReasoningFormat | None = None, thinking: bool = False,
                 prompt_texts: TokenText | TokenIdNames | None = None) -> None:
        self.chat, self.texts, self.prompts, self.echo, self.prompt_only = chat, texts, prompts, echo, prompt_only
        self.prompt_texts = prompt_texts
        self.tools = tools
        self.reasoning, self.thinking = reasoning, thinking
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.sent: dict[int, _Sent] = {}
        self.answers: dict[int, AnswerStream] = {}

    def piece(self, idx: int, i: int, out: RequestOutput, c: CompletionOutput) -> tuple[str, dict | None]:
        """Text and logprobs of choice `idx` (prompt `i`): `c` holds what was not rendered before."""
        sent = self.sent.setdefault(idx, _Sent())
        text, logprobs = "", None
        if not sent.started:
            sent.started = True
            if self.echo is not None:
                text, logprobs = self.echo[i], self._echo_logprobs(i, out, sent)
        if self.prompt_only:
            return text, logprobs
        text += c.text
        if self.texts is not None:
            if self.chat:
                logprobs = chat_logprobs(self.texts, c.token_ids, c.logprobs)
            else:
                new, sent.offset = completion_logprobs(self.texts, c.token_ids, c.logprobs, sent.offset)
                logprobs = concat(logprobs, new)
        sent.tokens += len(c.token_ids)
        return text, logprobs

    def _answer(self) -> AnswerStream:
        return AnswerStream(self.reasoning, self.thinking, self.tools)

    def update(self, idx: int, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        """The stream chunk's choice for what is new in choice `idx`; None when nothing is (a request's
        outputs hold every choice, finished ones too, and a finish reason goes out once)."""
        sent = self.sent.setdefault(idx, _Sent())
        if sent.finished:
            return None
        text, logprobs = self.piece(idx, i, out, c)
        sent.finished = c.finish_reason is not None
        if not self.chat:
            new = text or num_tokens(logprobs) or sent.finished
            return self.choice(idx, text, logprobs, c.finish_reason) if new else None
        answer = self.answers.get(idx) or self.answers.setdefault(idx, self._answer())
        piece = answer.feed(text, final=sent.finished)
        if piece.content or piece.reasoning or piece.calls or num_tokens(logprobs) or sent.finished:
            return self.delta(idx, piece.content, logprobs, answer.finish_reason(c.finish_reason),
                              tool_calls=piece.calls, reasoning=piece.reasoning)
        return None

    def prompt_logprobs(self, i: int, out: RequestOutput) -> list[dict | None] | None:
        """vLLM's prompt_logprobs of prompt `i` (None if they were not computed: an abort)."""
        if out.prompt_logprobs is None:
            return None
        return prompt_logprobs(self.prompt_texts, self.prompts[i], out.prompt_logprobs)

    def _echo_logprobs(self, i: int, out: RequestOutput, sent: _Sent) -> dict | None:
        if self.texts is None or self.chat:  # (a chat answer's echo is text only)
            return None
        ids = self.prompts[i]
        entries = list(out.prompt_logprobs or [])
        entries += [None] * (len(ids) - len(entries))  # an abort can come before the prompt was computed
        logprobs, sent.offset = completion_logprobs(self.texts, ids, entries, 0)
        return logprobs

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        answer = self._answer()
        piece = answer.feed(text, final=True)
        message = {"role": "assistant", "content": piece.content, "refusal": None}
        if answer.made_calls:
            message.update(content=piece.content or None, tool_calls=answer.tool_calls())
        if self.reasoning is not None:  # (an answer that is all thinking has no content)
            message.update(content=message["content"] or None, reasoning_content=piece.reasoning or None)
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": answer.finish_reason(finish_reason)}

    def delta(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool = False, tool_calls: list[dict] | None = None, reasoning: str = "") -> dict:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        if reasoning:
            delta["reasoning_content"] = reasoning
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def usage(self, finals) -> dict:
        """`finals`: each prompt's last output (for its cached-token count)."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = 0 if self.prompt_only else sum(s.tokens for s in self.sent.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(out.num_cached_tokens for out in finals)}}
