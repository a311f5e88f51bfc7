"""ASGI middleware in front of the routes: request ids, API key, draining, body size and read
deadline, and the catch-all for unexpected errors.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnects pass through untouched.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import uuid
from dataclasses import dataclass, field

from server.errors import APIError

logger = logging.getLogger("kvserve.server")

# What a client's X-Request-Id may hold to be used as given (it reaches logs and headers).
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key, and while draining


@dataclass
class ServerOptions:
    api_key: str | None = None
    max_queue_len: int | None = None  # sequences beyond max_num_seqs that may wait; None = no limit
    max_body_bytes: int = 16 << 20
    shutdown_timeout: float = 30.0
    body_read_timeout: float = 30.0  # seconds for a whole request body to arrive
    chat_template: str | None = None  # a Jinja chat template in place of the model's own
    tool_call_parser: str = "auto"  # a name in server.tool_calls.PARSERS, or "auto": read from the template
    reasoning_parser: str | None = None  # a name in server.reasoning.FORMATS; None: no reasoning split
    responses_store_size: int = 1024  # responses kept for previous_response_id and GET (0: none)
    chat_template_name: str | None = None  # set when chat_template is a shipped one chosen for the model
    trust_request_chat_template: bool = False  # requests may bring their own chat_template
    # CORS (Starlette's CORSMiddleware): no origin is allowed unless named
    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


class Guard:
    def __init__(self, app, options: ServerOptions, app_state, on_response=None) -> None:
        self.app = app
        self.options = options
        self.app_state = app_state  # .draining is set by the shutdown handler
        self.on_response = on_response  # (path, status) of every response started, for metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"")
        request_id = given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.on_response is not None:
                    self.on_response(scope["path"], message["status"])
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id, headers)
        except Exception:
            logger.exception("request %s: unexpected error", request_id)
            if not started:
                await self._reject(scope, send_with_id, 500, f"Internal server error (request id {request_id}).",
                                   "internal_server_error")

    async def _guarded(self, scope, receive, send, headers) -> None:
        open_path = scope["path"] in OPEN_PATHS
        if not open_path and self.options.api_key is not None and not self._authorized(headers):
            return await self._reject(scope, send, 401, "Invalid or missing API key (Authorization: Bearer ... or "
                                      "x-api-key).", "authentication_error", "invalid_api_key")
        if not open_path and getattr(self.app_state, "draining", False):
            return await self._reject(scope, send, 503, "The server is shutting down.", "service_unavailable",
                                      extra=[(b"retry-after", b"5")])
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.options.body_read_timeout)
        except TimeoutError:
            return await self._reject(scope, send, 408, f"The request body did not arrive within "
                                      f"{self.options.body_read_timeout:g} s.", "invalid_request_error",
                                      "request_timeout", extra=[(b"connection", b"close")])
        if body is None:
            return await self._reject(scope, send, 413, f"Request body exceeds {self.options.max_body_bytes} bytes.",
                                      "invalid_request_error", "request_too_large")
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if (body or media) and not _is_json(media):
            # browsers send text/plain (and forms) cross-site without a CORS preflight: such a body
            # is not read, or any web page could make a key-less local server generate
            return await self._reject(scope, send, 415, f"Request bodies must be JSON with Content-Type "
                                      f"application/json (got {media.decode(errors='replace')[:64] or 'none'!r}).",
                                      "invalid_request_error", "unsupported_media_type")
        return await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers) -> bool:
        """`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's)."""
        key = self.options.api_key.encode()
        bearer = hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + key)
        return hmac.compare_digest(headers.get(b"x-api-key", b""), key) or bearer

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
    async def _reject(scope, send, status: int, message: str, type_: str, code: str | None = None, extra=()):
        error = APIError(status, message, type_, code=code)
        error.log(scope["state"]["request_id"], scope["method"], scope["path"])
        status, body = error.response_for(scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def _is_json(media: bytes) -> bool:
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the real channel, which reports disconnects

    return replayed


def header_deadline_protocol(timeout: float):
    """uvicorn's h11 protocol, except that a connection whose request line and headers have not
    all arrived `timeout` seconds after its first byte (or after it opened) is closed: uvicorn
    bounds only idle keep-alive connections, so a client sending a byte a second could hold a
    connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in; the body has its own deadline (Guard)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
