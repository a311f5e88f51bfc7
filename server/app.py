"""The FastAPI application: OpenAI-compatible completions and chat over the async engine."""
from __future__ import annotations

import asyncio
import json
import time
import logging
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM, EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.guard import Guard, ServerOptions
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
        if body.logprobs is not None or body.echo:
            raise APIError(400, "logprobs and echo are not supported yet", param="logprobs" if body.logprobs else "echo")
        params = _params(body, body.max_tokens)
        prompts = _prompt_ids(engine, _call(body.prompts), params)
        admit()
        return await _respond(raw, engine, model_name, "cmpl", prompts, params, body.stream, body.include_usage,
                              chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, model_name)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported yet", param="logprobs")
        params = _params(body, body.max_new_tokens())
        ids = _chat_ids(engine.engine.tokenizer, body.message_dicts(), add_generation_prompt=True)
        prompts = _prompt_ids(engine, [ids], params)
        admit()
        return await _respond(raw, engine, model_name, "chatcmpl", prompts, params, body.stream,
                              body.include_usage, chat=True)

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


def _params(body, max_tokens: int | None) -> SamplingParams:
    return _call(lambda: body.sampling_params(max_tokens))


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


async def _respond(raw: Request, engine, model_name, prefix, prompts, params, stream: bool, include_usage: bool,
                   chat: bool):
    state = raw.app.state
    request_id = f"{raw.state.request_id}-{uuid.uuid4().hex[:8]}"  # client ids may repeat; engine ids may not
    logger.info("request %s: %d prompt(s), n=%d, max_tokens=%s, stream=%s", request_id, len(prompts), params.n,
                params.max_tokens, stream)
    shape = _ChatShape() if chat else _CompletionShape()
    base = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    if stream:  # Starlette cancels the body iterator when the client goes: that aborts the requests
        return StreamingResponse(_release_after(state, _sse(engine, prompts, params, request_id, base, shape,
                                                            include_usage)), media_type="text/event-stream")
    try:
        finals = await _until_disconnect(raw, _collect(engine, prompts, params, request_id))
    finally:
        state.in_flight -= 1
    choices = [shape.choice(i * params.n + c.index, c.text, c.finish_reason)
               for i in sorted(finals) for c in finals[i].outputs]
    logger.info("request %s: finished %s", request_id, [c["finish_reason"] for c in choices])
    return {**base, "object": shape.object, "choices": choices, "usage": _usage(prompts, finals.values())}


async def _release_after(state, events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield event
    finally:
        state.in_flight -= 1


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


async def _sse(engine, prompts, params, request_id, base, shape, include_usage) -> AsyncIterator[str]:
    sent: dict[int, int] = {}  # choice index -> characters sent
    finals: dict[int, RequestOutput] = {}
    chunk = {**base, "object": shape.chunk_object}
    try:
        if shape.role_first:
            for i in range(len(prompts) * params.n):
                yield _event({**chunk, "choices": [shape.delta(i, None, None, first=True)]})
        async for i, out in _outputs(engine, prompts, params, request_id):
            finals[i] = out
            for c in out.outputs:
                idx = i * params.n + c.index
                delta = c.text[sent.get(idx, 0):]
                if delta or c.finish_reason:
                    sent[idx] = len(c.text)
                    yield _event({**chunk, "choices": [shape.delta(idx, delta, c.finish_reason)]})
        if include_usage:
            yield _event({**chunk, "choices": [], "usage": _usage(prompts, finals.values())})
    except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
        yield _event(APIError(500, f"engine failure: {e}", type_="internal_server_error").body())
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompts: list[list[int]], finals) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


class _CompletionShape:
    object, chunk_object, role_first = "text_completion", "text_completion", False

    @staticmethod
    def choice(index, text, finish_reason):
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, index, text, finish_reason, first=False):
        return self.choice(index, text or "", finish_reason)


class _ChatShape:
    object, chunk_object, role_first = "chat.completion", "chat.completion.chunk", True

    @staticmethod
    def choice(index, text, finish_reason):
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    @staticmethod
    def delta(index, text, finish_reason, first=False):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
