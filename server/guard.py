"""ASGI middleware in front of the routes: request ids, API key, draining, body size.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnects pass through untouched.
"""
from __future__ import annotations

import hmac
import json
import uuid
from dataclasses import dataclass


@dataclass
class ServerOptions:
    api_key: str | None = None
    max_queue_len: int | None = None  # requests beyond max_num_seqs that may wait; None = no limit
    max_body_bytes: int = 16 << 20
    shutdown_timeout: float = 30.0


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class Guard:
    def __init__(self, app, options: ServerOptions, app_state) -> None:
        self.app = app
        self.options = options
        self.app_state = app_state  # .draining is set by the shutdown handler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        api = scope["path"].startswith("/v1/")
        if api and self.options.api_key is not None and not self._authorized(headers):
            return await self._reject(send_with_id, 401, "Invalid or missing API key (Authorization: Bearer ...).",
                                      "authentication_error", "invalid_api_key")
        if api and getattr(self.app_state, "draining", False):
            return await self._reject(send_with_id, 503, "The server is shutting down.", "service_unavailable",
                                      extra=[(b"retry-after", b"5")])
        body = await self._read_body(receive)
        if body is None:
            return await self._reject(send_with_id, 413, f"Request body exceeds {self.options.max_body_bytes} bytes.",
                                      "invalid_request_error", "request_too_large")
        return await self.app(scope, _replay(body, receive), send_with_id)

    def _authorized(self, headers) -> bool:
        given = headers.get(b"authorization", b"")
        expected = f"Bearer {self.options.api_key}".encode()
        return hmac.compare_digest(given, expected)

    async def _read_body(self, receive) -> bytes | None:
        """The whole request body, or None once it passes the limit (JSON bodies are small)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client left; the app will see the disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.options.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reject(send, status: int, message: str, type_: str, code: str | None = None, extra=()):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": error_body(message, type_, code)})


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the real channel, which reports disconnects

    return replayed
