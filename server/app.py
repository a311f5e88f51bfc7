"""The FastAPI application: wiring only. The routes live in server/routes/ (one module per
protocol), what they share in server/context.py; this module builds the shared parts once and
puts the routes, the guard and the error handlers together."""
from __future__ import annotations

import dataclasses

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.frontend.async_llm import AsyncLLM
from server import templates
from server.context import Admission, Offload, ServerContext
from server.docs import mount_docs
from server.errors import APIError, invalid_request
from server.guard import Guard, ServerOptions
from server.logprobs import TokenText
from server.openapi import document
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.protocol_messages import CountTokensRequest, MessagesRequest
from server.protocol_responses import ResponsesRequest
from server.reasoning import FORMATS as REASONING_FORMATS
from server.routes import chat, completions, health, messages, models, responses, tokenize
from server.store import ResponseStore
from server.tool_calls import FORMATS, ToolFormat, detect

ROUTERS = (health, models, tokenize, completions, chat, responses, messages)


def create_app(engine: AsyncLLM, model_name: str, options: ServerOptions | None = None) -> FastAPI:
    options = with_tool_template(options or ServerOptions(), engine.tokenizer.chat_template)
    app = FastAPI(title="kvserve", version="0.1.0", docs_url=None, redoc_url=None)  # server/docs.py's instead
    tool_format = resolve_tool_format(options.tool_call_parser, options.chat_template or engine.tokenizer.chat_template)
    reasoning = REASONING_FORMATS[options.reasoning_parser] if options.reasoning_parser else None
    app.state.ctx = ServerContext(engine, model_name, options, Offload(engine.tokenizer),
                                  Admission(engine.max_num_seqs, options.max_queue_len), TokenText(engine.tokenizer),
                                  tool_format, reasoning, ResponseStore(options.responses_store_size))
    app.state.draining = False  # set on SIGTERM (server/cli.py); the guard then answers 503
    app.add_middleware(Guard, options=options, app_state=app.state,
                       on_response=_response_counter(engine, model_name, app))
    # outside the guard: a preflight carries no API key, and refusals get CORS headers too
    app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=options.allowed_methods,
                       allow_headers=options.allowed_headers, allow_credentials=options.allow_credentials)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for module in ROUTERS:
        app.include_router(module.router)
    mount_docs(app)
    document(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                   "/v1/responses": ResponsesRequest, "/v1/messages": MessagesRequest,
                   "/v1/messages/count_tokens": CountTokensRequest, "/tokenize": TokenizeRequest,
                   "/detokenize": DetokenizeRequest})
    return app


async def _api_error(request: Request, e: APIError):
    e.log(request.state.request_id, request.method, request.url.path)
    status, body = e.response_for(request.url.path)
    return JSONResponse(body, status_code=status, headers=e.headers)


async def _validation_error(request: Request, e: RequestValidationError):
    return await _api_error(request, invalid_request(list(e.errors())))


async def _http_error(request: Request, e: StarletteHTTPException):
    headers = e.headers
    if e.status_code == 405:  # Allow lists every method of the path (Starlette names the first route's only)
        path = request.url.path
        methods = {m for r in _routes(request.app) if r.path_regex.match(path) for m in r.methods or ()}
        headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
    return await _api_error(request, APIError(e.status_code, str(e.detail), headers=headers))


def _routes(app: FastAPI) -> list:
    """Every route of the app (FastAPI 0.165 lists included routers lazily: their routes are read
    from the routers themselves)."""
    return [r for r in app.router.routes if hasattr(r, "path_regex")] + [
        r for module in ROUTERS for r in module.router.routes]


def _response_counter(engine: AsyncLLM, model_name: str, app: FastAPI):
    """`kvserve:http_requests_total{route, status}` in the engine's registry (what /metrics
    exports). The route is the path's template (`/v1/responses/{response_id}`), also for answers
    the guard gives before routing (401, 413); a path the app has no route for counts as route
    "other", so that clients cannot make series without bound."""
    family = Counter("kvserve:http_requests", "HTTP responses by route and status code.",
                     ["model_name", "route", "status"], registry=engine.metrics_registry)
    routes: list | None = None

    def count(path: str, status: int) -> None:
        nonlocal routes
        if routes is None:  # the first response: every route is defined by then
            routes = _routes(app)
        route = next((r.path for r in routes if r.path_regex.match(path)), "other")
        family.labels(model_name, route, str(status)).inc()

    return count


def with_tool_template(options: ServerOptions, own: str | None) -> ServerOptions:
    """Where no template is given and the model's own shows no tools, the shipped template that
    renders the same and shows them (server/templates.py)."""
    name = templates.tool_template_for(own) if options.chat_template is None else None
    if name is None:
        return options
    return dataclasses.replace(options, chat_template=templates.read_shipped(name), chat_template_name=name)


def resolve_tool_format(parser: str, chat_template: str | None) -> ToolFormat | None:
    """The format named, or for "auto" the one the chat template shows (None if unclear)."""
    name = detect(chat_template) if parser == "auto" else parser
    return FORMATS[name] if name is not None else None
