"""The FastAPI application: OpenAI-compatible completions and chat over the async engine."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.core.outputs import CompletionOutput, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.frontend.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from server.errors import APIError, call, invalid_request, param_of
from server.guard import Guard, ServerOptions
from server.logprobs import TokenText, chat_logprobs, completion_logprobs, concat, num_tokens
from server.openapi import document
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    message_dicts,
    template_kwargs,
)
from server.reasoning import END as REASONING_END
from server.reasoning import FORMATS as REASONING_FORMATS
from server.reasoning import ReasoningFormat, ReasoningStream
from server.tool_calls import FORMATS, ToolCallStream, ToolFormat, detect, finish_reason

logger = logging.getLogger("kvserve.server")


class _Offload:
    """Work too heavy for the event loop (parsing big bodies, tokenizing long prompts, chat
    templates) runs on a thread, so /health and other requests' streams keep answering. Small work
    stays inline: each hop to a thread waits for the GIL behind the engine thread, and a burst of
    short requests spread over many hops misses the engine step that would have batched them.
    The thread has its own tokenizer: a Rust tokenizer used from two threads at once can raise
    "Already borrowed"."""

    INLINE_BODY_BYTES = 64 << 10  # parsed in well under a millisecond
    INLINE_CHARS = 4096  # tokenized in a few milliseconds (about 1 us a character here)

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # the event loop's
        self._thread_tokenizer = copy.deepcopy(tokenizer)
        self._parse = ThreadPoolExecutor(1, thread_name_prefix="kvserve-parse")
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="kvserve-tokenize")
        for pool in (self._parse, self._tokenize):
            # Start the threads now: a pool starts its thread at the first task, and Thread.start()
            # then waits for the GIL while that task (a long parse) holds it: the loop stalled ~1 s.
            pool.submit(int).result()

    async def parse(self, raw: Request, model: type[BaseModel]):
        data = await raw.body()
        try:
            if len(data) <= self.INLINE_BODY_BYTES:
                return model.model_validate_json(data)
            return await asyncio.get_running_loop().run_in_executor(self._parse, model.model_validate_json, data)
        except ValidationError as e:
            raise invalid_request(e.errors(include_url=False)) from None

    async def tokenize(self, fn, size: int):
        """fn(tokenizer), inline when `size` (characters or tokens) is small, else on the tokenizer
        thread; its ValueErrors become 400s naming their field."""
        if size <= self.INLINE_CHARS:
            return call(lambda: fn(self.tokenizer))
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize, call, lambda: fn(self._thread_tokenizer))


class _Admission:
    """Counts sequences (prompts x n), not HTTP requests: at most max_num_seqs in one request, and
    with --max-queue-len at most max_num_seqs + max_queue_len in flight over all requests."""

    def __init__(self, max_num_seqs: int, max_queue_len: int | None) -> None:
        self.per_request = max_num_seqs
        self.limit = None if max_queue_len is None else max_num_seqs + max_queue_len
        self.in_flight = 0  # sequences admitted and not yet answered

    def check_size(self, num_prompts: int, n: int, name: str = "n") -> None:
        """n: sequences per prompt (its choices, or under beam search its beams, `name` best_of)."""
        if num_prompts * n > self.per_request:
            param, what = (name, f"{name}={n}") if n > 1 else ("prompt", f"{num_prompts} prompts")
            if n > 1 and num_prompts > 1:
                what = f"{num_prompts} prompts x {name}={n}"
            raise APIError(400, f"{param}: {what} asks for {num_prompts * n} sequences; this server runs at most "
                                f"{self.per_request} per request", param=param)

    def admit(self, num_seqs: int) -> None:
        if self.limit is not None and self.in_flight + num_seqs > self.limit:
            raise APIError(503, f"The server is at capacity ({self.in_flight} of {self.limit} sequences in "
                                "flight); retry later.", type_="service_unavailable", headers={"Retry-After": "1"})
        self.in_flight += num_seqs  # _respond gives them back when the answer is complete

    def release(self, num_seqs: int) -> None:
        self.in_flight -= num_seqs


def create_app(engine: AsyncLLM, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    app = FastAPI(title="kvserve", version="0.1.0")
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.draining = False
    app.state.admission = admission = _Admission(engine.max_num_seqs, options.max_queue_len)
    app.add_middleware(Guard, options=options, app_state=app.state,
                       on_response=_response_counter(engine, model_name, app))
    token_text = TokenText(engine.tokenizer)
    work = _Offload(engine.tokenizer)
    template = options.chat_template  # None: the model's own
    app.state.tool_format = tool_format = resolve_tool_format(options.tool_call_parser,
                                                              template or engine.tokenizer.chat_template)
    reasoning = REASONING_FORMATS[options.reasoning_parser] if options.reasoning_parser else None

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        error = invalid_request(list(e.errors()))
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), type_="invalid_request_error").body(),
                            status_code=e.status_code, headers=e.headers)  # 405 keeps its Allow header

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "kvserve",
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(raw: Request):
        body = await work.parse(raw, TokenizeRequest)
        _check_model(body.model, model_name)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            messages = call(lambda: message_dicts(body.messages))
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            kwargs = call(lambda: template_kwargs(body.chat_template_kwargs))
            size = _num_chars(messages, tools)
            call(lambda: engine.check_prompt_chars(size))
            ids = await work.tokenize(
                lambda tok: _chat_ids(tok, messages, body.add_generation_prompt, tools, template, kwargs), size)
        else:
            call(lambda: engine.check_prompt_chars(len(body.prompt)))
            ids = await work.tokenize(lambda tok: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens),
                                      len(body.prompt))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(raw: Request):
        body = await work.parse(raw, DetokenizeRequest)
        _check_model(body.model, model_name)
        vocab = engine.vocab_size

        def decode(tok) -> str:
            if any(not 0 <= t < vocab for t in body.tokens):
                raise ValueError(f"tokens: token ids must be in [0, {vocab})")
            return tok.decode(body.tokens)

        return {"prompt": await work.tokenize(decode, len(body.tokens))}

    @app.post("/v1/completions")
    async def completions(raw: Request):
        body = await work.parse(raw, CompletionRequest)
        _check_model(body.model, model_name)
        params = call(body.params)
        texts = call(body.prompts)
        admission.check_size(len(texts), *_width(params))
        await _compile_grammar(engine, params)

        def prepare(tok):
            prompts = [_prompt_ids(engine, tok, p, params) for p in texts]
            if not body.echo:
                return prompts, None
            return prompts, [t if isinstance(t, str) else tok.decode(ids) for t, ids in zip(texts, prompts)]

        prompts, echo = await work.tokenize(prepare, sum(map(len, texts)))
        render = _Render(False, token_text if body.logprobs is not None else None, prompts, echo, body.prompt_only)
        return await _respond(raw, engine, "cmpl", prompts, params, body, render)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        body = await work.parse(raw, ChatCompletionRequest)
        _check_model(body.model, model_name)
        params = call(lambda: body.params(tool_format))
        messages, tools = call(body.message_dicts), body.tool_dicts()
        kwargs = call(lambda: template_kwargs(body.chat_template_kwargs))
        thinking = reasoning is not None and reasoning.thinks(kwargs)
        if thinking and params.structured_outputs is not None:  # the thinking is free, the answer held
            params.structured_outputs = dataclasses.replace(params.structured_outputs, start_after=REASONING_END)
        admission.check_size(1, *_width(params))
        await _compile_grammar(engine, params)
        size = _num_chars(messages, tools)
        call(lambda: engine.check_prompt_chars(size))  # before templating megabytes
        prompts = await work.tokenize(lambda tok: [_prompt_ids(
            engine, tok, _chat_ids(tok, messages, True, tools, template, kwargs), params)], size)
        calls = tool_format if body.tool_choice_mode() is not None else None
        render = _Render(True, token_text if body.logprobs else None, prompts, tools=calls,
                         reasoning=reasoning, thinking=thinking)
        return await _respond(raw, engine, "chatcmpl", prompts, params, body, render)

    document(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                   "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest})
    return app


def _response_counter(engine: AsyncLLM, model_name: str, app: FastAPI):
    """`kvserve:http_requests_total{route, status}` in the engine's registry (what /metrics
    exports); a path the app has no route for counts as route "other", so that clients cannot
    make series without bound."""
    family = Counter("kvserve:http_requests", "HTTP responses by route and status code.",
                     ["model_name", "route", "status"], registry=engine.metrics_registry)
    routes: frozenset[str] | None = None

    def count(path: str, status: int) -> None:
        nonlocal routes
        if routes is None:  # the first response: every route is defined by then
            routes = frozenset(r.path for r in app.routes)
        family.labels(model_name, path if path in routes else "other", str(status)).inc()

    return count


async def _compile_grammar(engine: AsyncLLM, params: SamplingParams) -> None:
    """A schema, regex or grammar that does not compile is a 400 before anything runs."""
    try:
        await engine.compile_grammar(params)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e))) from e


def resolve_tool_format(parser: str, chat_template: str | None) -> ToolFormat | None:
    """The tool-call format named, or for "auto" the one the chat template shows (None if unclear)."""
    name = detect(chat_template) if parser == "auto" else parser
    return FORMATS[name] if name is not None else None


def _num_chars(messages: list[dict], tools: list[dict] | None = None) -> int:
    """The size of a conversation, to bound it before templating (tools count as their JSON)."""
    return sum(len(m["content"]) for m in messages) + (len(json.dumps(tools)) if tools else 0)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
              chat_template: str | None = None, kwargs: dict | None = None) -> list[int]:
    """kwargs: the request's chat_template_kwargs, variables for the template."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                            tools=tools, chat_template=chat_template, **(kwargs or {}))
    except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {e}", param="messages") from e
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise APIError(404, f"The model `{asked}` does not exist.", param="model", code="model_not_found")


def _prompt_ids(engine: AsyncLLM, tokenizer, prompt: str | list[int], params: SamplingParams) -> list[int]:
    """Tokenize and check a prompt before any generation starts, so errors are plain 400s."""
    return engine.prepare_prompt(prompt, params, tokenizer)


async def _outputs(engine: AsyncLLM, prompts: list[list[int]], params: SamplingParams,
                   request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run every prompt at once; yield (prompt index, output) as they come. Leaving aborts all."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        try:
            async for out in engine.generate(ids, params, f"{request_id}-{i}", checked=True):
                await merged.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await merged.put((i, e))
        await merged.put((i, None))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # generate()'s own finally aborts the request in the engine


def _width(params: SamplingParams) -> tuple[int, str]:
    """Sequences one prompt runs, and the field that sets them."""
    return params.beam_width, "best_of" if params.use_beam_search else "n"


async def _respond(raw: Request, engine: AsyncLLM, prefix: str, prompts: list[list[int]], params: SamplingParams,
                   body, render: _Render):
    state = raw.app.state
    # A stream sends what is new at each step; a whole answer needs the engine's output once.
    params = dataclasses.replace(params, output_kind="delta" if body.stream else "final")
    num_seqs = len(prompts) * params.beam_width
    state.admission.admit(num_seqs)
    release = functools.partial(state.admission.release, num_seqs)
    request_id = f"{raw.state.request_id}-{uuid.uuid4().hex[:8]}"  # client ids may repeat; engine ids may not
    logger.info("request %s: %d prompt(s), n=%d, max_tokens=%s, stream=%s", request_id, len(prompts), params.n,
                params.max_tokens, body.stream)
    base = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if body.stream:  # Starlette cancels the body iterator when the client goes: that aborts the requests
        events = _sse(engine, prompts, params, request_id, base, render, body.include_usage)
        return _ReleasingStream(events, release=release, media_type="text/event-stream")
    try:
        finals = await _until_disconnect(raw, _collect(engine, prompts, params, request_id))
    finally:
        release()
    choices = []
    for i in sorted(finals):
        for c in finals[i].outputs:
            idx = i * params.n + c.index
            choices.append(render.choice(idx, *render.piece(idx, i, finals[i], c), c.finish_reason))
    logger.info("request %s: finished %s", request_id, [c["finish_reason"] for c in choices])
    return {**base, "object": render.object, "choices": choices, "usage": render.usage(finals.values())}


class _ReleasingStream(StreamingResponse):
    """Gives the admission slot back however the response ends, also when the body never starts
    (a client gone before the first byte: the body generator is then never entered)."""

    def __init__(self, content, release, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _collect(engine, prompts, params, request_id) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for i, out in _outputs(engine, prompts, params, request_id):
            finals[i] = out
    except (EngineDeadError, RequestFailedError) as e:
        raise APIError(500, f"engine failure: {e}", type_="internal_server_error") from e
    return finals


async def _until_disconnect(raw: Request, work):
    """Await `work`, cancelling it (and so aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let its finally blocks abort
    if task.cancelled():
        raise APIError(499, "client disconnected")  # nobody reads it; ends the handler cleanly
    return task.result()


async def _sse(engine, prompts, params, request_id, base, render: _Render, include_usage) -> AsyncIterator[str]:
    finals: dict[int, RequestOutput] = {}
    chunk = {**base, "object": render.chunk_object}
    try:
        if render.chat:  # chat streams open with the role, once per choice
            for i in range(len(prompts) * params.n):
                yield _event({**chunk, "choices": [render.delta(i, None, None, None, first=True)]})
        async for i, out in _outputs(engine, prompts, params, request_id):
            finals[i] = out
            for c in out.outputs:
                idx = i * params.n + c.index
                choice = render.update(idx, i, out, c)
                if choice is not None:
                    yield _event({**chunk, "choices": [choice]})
        if include_usage:
            yield _event({**chunk, "choices": [], "usage": render.usage(finals.values())})
    except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
        yield _event(APIError(500, f"engine failure: {e}", type_="internal_server_error").body())
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class _Sent:
    """How much of one choice has been rendered so far."""

    started: bool = False
    tokens: int = 0
    offset: int = 0  # text_offset of the next token (completions logprobs)
    finished: bool = False


class _Render:
    """Engine outputs -> OpenAI choices. One code path renders a whole answer (one call per choice,
    on the engine's final output) and a stream (one call per update, on the engine's deltas), so the
    two agree. With `reasoning` (a reasoning parser), a chat answer's thinking segment becomes
    `reasoning_content` (where the request thinks). With `tools` (the format of the model's tool
    calls), the answer after it goes through a tool-call parser: the calls become `tool_calls`, the
    rest `content`."""

    def __init__(self, chat: bool, texts: TokenText | None, prompts: list[list[int]],
                 echo: list[str] | None = None, prompt_only: bool = False, tools: ToolFormat | None = None,
                 reasoning: ReasoningFormat | None = None, thinking: bool = False) -> None:
        self.chat, self.texts, self.prompts, self.echo, self.prompt_only = chat, texts, prompts, echo, prompt_only
        self.tools = tools
        self.reasoning, self.thinking = reasoning, thinking
        self.thoughts: dict[int, ReasoningStream] = {}
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.sent: dict[int, _Sent] = {}
        self.calls: dict[int, ToolCallStream] = {}

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

    def update(self, idx: int, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        """The stream chunk's choice for what is new in choice `idx`; None when nothing is (a request's
        outputs hold every choice, finished ones too, and a finish reason goes out once)."""
        sent = self.sent.setdefault(idx, _Sent())
        if sent.finished:
            return None
        text, logprobs = self.piece(idx, i, out, c)
        sent.finished = c.finish_reason is not None
        reason, calls, thought = c.finish_reason, None, ""
        if self.reasoning is not None:
            thoughts = self.thoughts.setdefault(idx, ReasoningStream(self.reasoning, self.thinking))
            thought, text = thoughts.feed(text, final=sent.finished)
        if self.tools is not None:
            stream = self.calls.setdefault(idx, ToolCallStream(self.tools))
            text, calls = stream.feed(text, final=sent.finished)
            reason = finish_reason(reason, stream)
        if text or thought or calls or num_tokens(logprobs) or sent.finished:
            return self.delta(idx, text, logprobs, reason, tool_calls=calls, reasoning=thought)
        return None

    def _echo_logprobs(self, i: int, out: RequestOutput, sent: _Sent) -> dict | None:
        if self.texts is None:
            return None
        ids = self.prompts[i]
        entries = list(out.prompt_logprobs or [])
        entries += [None] * (len(ids) - len(entries))  # an abort can come before the prompt was computed
        logprobs, sent.offset = completion_logprobs(self.texts, ids, entries, 0)
        return logprobs

    def choice(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        thought = ""
        if self.reasoning is not None:
            thought, text = self.reasoning.split(text, True, self.thinking)
        message = {"role": "assistant", "content": text}
        if self.tools is not None:
            message, finish_reason = self._with_tool_calls(text, finish_reason)
        if self.reasoning is not None:  # (an answer that is all thinking has no content)
            message.update(content=message["content"] or None, reasoning_content=thought or None)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def _with_tool_calls(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        stream = ToolCallStream(self.tools)
        content, _ = stream.feed(text, final=True)
        if not stream.ids:
            return {"role": "assistant", "content": content}, reason
        return ({"role": "assistant", "content": content or None, "tool_calls": stream.tool_calls()},
                finish_reason(reason, stream))

    def delta(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool = False, tool_calls: list[dict] | None = None, reasoning: str = "") -> dict:
        if not self.chat:
            return self.choice(index, text or "", logprobs, finish_reason)
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
