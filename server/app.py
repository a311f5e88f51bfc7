"""The FastAPI application: OpenAI-compatible completions and chat over the async engine."""
from __future__ import annotations

import asyncio
import json
import time
import logging
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM, EngineDeadError
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from server.guard import Guard, ServerOptions
from server.logprobs import TokenText, chat_logprobs, completion_logprobs, concat, num_tokens
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


logger = logging.getLogger("kvserve.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param_of(message: str) -> str | None:
    """Our ValueErrors start with the offending field: 'temperature: must be ...'."""
    head = message.split(":", 1)[0]
    return head if head.isidentifier() else None


def create_app(engine: AsyncLLM, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    app = FastAPI(title="kvserve", version="0.1.0")
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.draining = False
    app.state.in_flight = 0  # generation requests admitted and not yet answered
    app.add_middleware(Guard, options=options, app_state=app.state)
    # Admission: what the engine can run at once plus the allowed queue.
    token_text = TokenText(engine.engine.tokenizer)
    admit_limit = None if options.max_queue_len is None else engine.engine.config.max_num_seqs + options.max_queue_len

    def admit() -> None:
        if admit_limit is not None and app.state.in_flight >= admit_limit:
            raise APIError(503, f"The server is at capacity ({admit_limit} requests in flight); retry later.",
                           type_="service_unavailable", headers={"Retry-After": "1"})
        app.state.in_flight += 1  # _respond gives it back when the answer is complete

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), type_="invalid_request_error").body(),
                            status_code=e.status_code)

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(engine.engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "kvserve",
                                            "max_model_len": engine.engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(body.model, model_name)
        tokenizer = engine.engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages)
            ids = _chat_ids(tokenizer, chat.message_dicts(), body.add_generation_prompt)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(body.model, model_name)
        vocab = engine.engine.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": engine.engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, model_name)
        params = _call(body.params)
        texts = _call(body.prompts)
        prompts = _prompt_ids(engine, texts, params)
        tokenizer = engine.engine.tokenizer
        echo = [t if isinstance(t, str) else tokenizer.decode(ids) for t, ids in zip(texts, prompts)] if body.echo else None
        render = _Render(False, token_text if body.logprobs is not None else None, prompts, echo, body.prompt_only)
        admit()
        return await _respond(raw, engine, "cmpl", prompts, params, body, render)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, model_name)
        params = _call(body.params)
        ids = _chat_ids(engine.engine.tokenizer, body.message_dicts(), add_generation_prompt=True)
        prompts = _prompt_ids(engine, [ids], params)
        render = _Render(True, token_text if body.logprobs else None, prompts)
        admit()
        return await _respond(raw, engine, "chatcmpl", prompts, params, body, render)

    return app


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {e}", param="messages") from e
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _call(fn):
    try:
        return fn()
    except ValueError as e:
        raise APIError(400, str(e), param=_param_of(str(e))) from e


def _check_model(asked: str | None, served: str) -> None:
    if asked is not None and asked != served:
        raise APIError(404, f"The model `{asked}` does not exist.", param="model", code="model_not_found")


def _prompt_ids(engine: AsyncLLM, prompts, params: SamplingParams) -> list[list[int]]:
    """Tokenize and check every prompt before any generation starts, so errors are plain 400s."""
    return [_call(lambda p=p: engine.engine.prepare_prompt(p, params)) for p in prompts]


async def _outputs(engine: AsyncLLM, prompts: list[list[int]], params: SamplingParams,
                   request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run every prompt at once; yield (prompt index, output) as they come. Leaving aborts all."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        try:
            async for out in engine.generate(ids, params, f"{request_id}-{i}"):
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


async def _respond(raw: Request, engine: AsyncLLM, prefix: str, prompts: list[list[int]], params: SamplingParams,
                   body, render: _Render):
    state = raw.app.state
    request_id = f"{raw.state.request_id}-{uuid.uuid4().hex[:8]}"  # client ids may repeat; engine ids may not
    logger.info("request %s: %d prompt(s), n=%d, max_tokens=%s, stream=%s", request_id, len(prompts), params.n,
                params.max_tokens, body.stream)
    base = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if body.stream:  # Starlette cancels the body iterator when the client goes: that aborts the requests
        events = _sse(engine, prompts, params, request_id, base, render, body.include_usage)
        return _ReleasingStream(events, release=lambda: _release(state), media_type="text/event-stream")
    try:
        finals = await _until_disconnect(raw, _collect(engine, prompts, params, request_id))
    finally:
        _release(state)
    choices = []
    for i in sorted(finals):
        for c in finals[i].outputs:
            idx = i * params.n + c.index
            choices.append(render.choice(idx, *render.piece(idx, i, finals[i], c), c.finish_reason))
    logger.info("request %s: finished %s", request_id, [c["finish_reason"] for c in choices])
    return {**base, "object": render.object, "choices": choices, "usage": render.usage(finals.values())}


def _release(state) -> None:
    state.in_flight -= 1


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
    except EngineDeadError as e:
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
    chars: int = 0
    tokens: int = 0
    offset: int = 0  # text_offset of the next token (completions logprobs)
    finished: bool = False


class _Render:
    """Engine outputs -> OpenAI choices. One code path renders a whole answer (one call per choice)
    and a stream (one call per update, each returning only what is new), so the two agree."""

    def __init__(self, chat: bool, texts: TokenText | None, prompts: list[list[int]],
                 echo: list[str] | None = None, prompt_only: bool = False) -> None:
        self.chat, self.texts, self.prompts, self.echo, self.prompt_only = chat, texts, prompts, echo, prompt_only
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.sent: dict[int, _Sent] = {}

    def piece(self, idx: int, i: int, out: RequestOutput, c: CompletionOutput) -> tuple[str, dict | None]:
        """Text and logprobs of choice `idx` (prompt `i`) not rendered before."""
        sent = self.sent.setdefault(idx, _Sent())
        text, logprobs = "", None
        if not sent.started:
            sent.started = True
            if self.echo is not None:
                text, logprobs = self.echo[i], self._echo_logprobs(i, out, sent)
        if self.prompt_only:
            return text, logprobs
        text += c.text[sent.chars:]
        sent.chars = len(c.text)
        if self.texts is not None:
            ids, entries = c.token_ids[sent.tokens:], c.logprobs[sent.tokens:]
            if self.chat:
                logprobs = chat_logprobs(self.texts, ids, entries)
            else:
                new, sent.offset = completion_logprobs(self.texts, ids, entries, sent.offset)
                logprobs = concat(logprobs, new)
        sent.tokens = len(c.token_ids)
        return text, logprobs

    def update(self, idx: int, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        """The stream chunk's choice for what is new in choice `idx`; None when nothing is (a request's
        outputs repeat every choice, finished ones too, and a finish reason goes out once)."""
        sent = self.sent.setdefault(idx, _Sent())
        if sent.finished:
            return None
        text, logprobs = self.piece(idx, i, out, c)
        sent.finished = c.finish_reason is not None
        if text or num_tokens(logprobs) or sent.finished:
            return self.delta(idx, text, logprobs, c.finish_reason)
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
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
              first: bool = False) -> dict:
        if not self.chat:
            return self.choice(index, text or "", logprobs, finish_reason)
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def usage(self, finals) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion = 0 if self.prompt_only else sum(len(c.token_ids) for out in finals for c in out.outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(out.num_cached_tokens for out in finals)}}
