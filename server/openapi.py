"""The OpenAPI document, made to say what the server really does.

The generation routes parse their bodies themselves (off the event loop, see context.Offload), so
FastAPI knows neither their request schemas nor their errors: both are written in here. Every
error is the OpenAI shape; validation errors are 400 (never FastAPI's 422); streams are
`text/event-stream`.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.errors import is_anthropic
from server.guard import OPEN_PATHS  # need no key, take no body

_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ANTHROPIC_ERROR_SCHEMA = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
}
_ERRORS = {
    "400": "Invalid request: a field out of range, unknown or not supported; `param` names it.",
    "401": "Missing or wrong API key (when the server was started with one).",
    "404": "Unknown model or path.",
    "405": "Method not allowed; the `Allow` header lists the allowed ones.",
    "408": "The request body did not arrive in time.",
    "413": "The request body is too large.",
    "415": "The request body is not JSON (its Content-Type is not application/json or a +json type).",
    "500": "A fault while serving this request (other requests are not affected).",
    "503": "At capacity or shutting down; `Retry-After` says when to retry.",
}
_STREAMING = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages")


def document(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Replace app.openapi with one that adds the request bodies of `bodies` (path -> model) and
    the error responses."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, bodies)
        return app.openapi_schema

    app.openapi = openapi


def _build(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = _ERROR_SCHEMA
    components["AnthropicError"] = _ANTHROPIC_ERROR_SCHEMA
    for path, item in schema["paths"].items():
        shape = "AnthropicError" if is_anthropic(path) else "ErrorResponse"
        error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}}
        for op in item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in bodies:
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": _component(components, bodies[path])}}}}
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string", "description":
                                                                         "Prometheus text format"}}}
            if path in _STREAMING:
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    "schema": {"type": "string", "description": "with `stream: true`: server-sent events (chat and "
                                                               "completions end with `data: [DONE]`)"}}
            errors = {"503": _ERRORS["503"]} if path in OPEN_PATHS else _ERRORS
            for code, text in errors.items():
                if code == "415" and path not in bodies:
                    continue
                code = "529" if code == "503" and is_anthropic(path) else code  # Anthropic's "overloaded"
                responses[code] = {"description": text, "content": error}
    return schema


def _component(components: dict, model: type[BaseModel]) -> str:
    """Put model's JSON schema (and the models it uses) under components; return its $ref."""
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components[model.__name__] = body
    return f"#/components/schemas/{model.__name__}"
