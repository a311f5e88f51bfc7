"""`kvserve serve [--model PATH] [flags]` (flag names as vLLM's)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import typing
from dataclasses import fields

from engine.core.config import EngineConfig, parse_bytes
from server.guard import ServerOptions, header_deadline_protocol
from server.reasoning import FORMATS as REASONING_FORMATS
from server.tool_calls import PARSERS


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action) -> str:  # no "(default: None)": the help says what None means
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small OpenAI-compatible LLM server.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it",
                       formatter_class=_Help)
    add_engine_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics (the docs "
                        "too) (default: env KVSERVE_API_KEY, else open)")
    s.add_argument("--max-queue-len", type=int, default=None,
                   help="sequences (prompts x n) that may wait beyond --max-num-seqs; more get 503 + Retry-After "
                        "(default: no limit)")
    s.add_argument("--max-request-body", type=parse_bytes, default=ServerOptions.max_body_bytes,
                   help="largest request body in bytes (e.g. 16MiB); larger ones get 413")
    s.add_argument("--shutdown-timeout", type=float, default=ServerOptions.shutdown_timeout,
                   help="on SIGTERM: seconds in-flight requests may take before they are aborted")
    s.add_argument("--timeout-keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open")
    s.add_argument("--header-read-timeout", type=float, default=10.0,
                   help="seconds a request line and headers may take to arrive; slower connections are closed")
    s.add_argument("--body-read-timeout", type=float, default=ServerOptions.body_read_timeout,
                   help="seconds a request body may take to arrive; slower ones get 408")
    s.add_argument("--limit-concurrency", type=int, default=512,
                   help="open connections and tasks beyond which new requests get 503 at once")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (a file, or the template itself) in place of the model's own; "
                        "server/chat_templates/smollm2_tool_use.jinja shows the bundled SmolLM2 its tools")
    s.add_argument("--tool-call-parser", default="auto", choices=("auto", *PARSERS),
                   help="how the model writes tool calls; auto: the one format the chat template shows, if any")
    s.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_FORMATS),
                   help="split a reasoning model's <think>...</think> segment into reasoning_content; "
                        "structured outputs and tool grammars then apply after it (default: off)")
    s.add_argument("--responses-store-size", type=int, default=ServerOptions.responses_store_size,
                   help="stored responses (the Responses API's store: true) kept in memory for previous_response_id "
                        "and GET /v1/responses/{id}, least recently used first out; lost on restart (0: none)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, from the field's type, default and metadata."""
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        parser.add_argument(flag, type=meta["parse"] or kind, default=f.default, choices=meta["choices"],
                            help=meta["help"])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)}).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)
    except ValueError as e:
        print(f"kvserve: {e}", file=sys.stderr)
        return 2
    from engine.frontend.llm_engine import follow_rank_zero
    try:
        if follow_rank_zero(config):  # torchrun's ranks 1.. serve nothing: they ran rank 0's steps
            return 0
    except ValueError as e:
        print(f"kvserve: {e}", file=sys.stderr)
        return 2
    from engine.frontend.async_llm import AsyncLLM
    from server.app import create_app

    problem = _check_server_flags(args)
    template, why = _chat_template(args.chat_template)
    if problem or why:
        print(f"kvserve: {problem or why}", file=sys.stderr)
        return 2
    options = ServerOptions(api_key=args.api_key or None, max_queue_len=args.max_queue_len,
                            max_body_bytes=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
                            body_read_timeout=args.body_read_timeout, chat_template=template,
                            tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                            responses_store_size=args.responses_store_size)
    engine = AsyncLLM(config)
    print(engine.describe(), flush=True)
    app = create_app(engine, engine.model_name, options)
    fmt = app.state.ctx.tool_format
    print(f"kvserve: tool calls: {fmt.name if fmt else 'off (no --tool-call-parser, none in the chat template)'}",
          flush=True)
    print(f"kvserve: serving on http://{args.host}:{args.port}", flush=True)
    server = _DrainingServer(app, engine, options.shutdown_timeout, host=args.host, port=args.port,
                             log_level=args.log_level, timeout_keep_alive=args.timeout_keep_alive,
                             limit_concurrency=args.limit_concurrency,
                             http=header_deadline_protocol(args.header_read_timeout))
    try:
        server.run()
    finally:
        engine.shutdown()
    if engine.error is not None:  # a supervisor (systemd, Kubernetes) restarts a process that exits non-zero
        print(f"kvserve: the engine failed ({engine.error}); exiting", file=sys.stderr)
        return 1
    return 0


def _check_server_flags(args: argparse.Namespace) -> str | None:
    if args.max_queue_len is not None and args.max_queue_len < 0:
        return "max_queue_len: must be non-negative"
    if not 0 <= args.responses_store_size <= 1 << 20:
        return "responses_store_size: must be in [0, 1048576]"
    for name in ("timeout_keep_alive", "header_read_timeout", "body_read_timeout", "limit_concurrency"):
        if getattr(args, name) <= 0:
            return f"{name}: must be positive"
    return None


def _chat_template(value: str | None) -> tuple[str | None, str | None]:
    """--chat-template's template, and what is wrong with it (vLLM's rule: a file, else the text)."""
    if value is None:
        return None, None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    elif not any(mark in value for mark in ("{{", "{%")):
        return None, f"chat_template: {value!r} is neither a file nor a Jinja template"
    try:
        import jinja2
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        return None, f"chat_template: not a valid Jinja template: {e}"
    return value, None


class _DrainingServer:
    """uvicorn, except that SIGTERM/SIGINT first drains: new requests get 503, in-flight ones
    get `timeout` seconds to finish, the rest are aborted (finish_reason "abort"), then exit."""

    def __init__(self, app, engine, timeout: float, **config) -> None:
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if outer.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                    return super().handle_exit(sig, frame)  # a second signal stops at once
                outer.draining = True
                app.state.draining = True
                outer.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(outer.drain(self)))

        self.app, self.engine, self.timeout, self.draining = app, engine, timeout, False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))

    def run(self) -> None:
        async def serve():
            self.loop = asyncio.get_running_loop()
            watch = asyncio.ensure_future(self.watch_engine())
            try:
                await self.server.serve()
            finally:
                watch.cancel()

        asyncio.run(serve())

    async def watch_engine(self) -> None:
        """Stop serving once the engine has died: /health says 503 meanwhile; main exits 1."""
        while self.engine.is_alive:
            await asyncio.sleep(0.5)
        logging.getLogger("kvserve.server").error("the engine died; shutting down")
        self.server.should_exit = True

    async def drain(self, server) -> None:
        admission = self.app.state.ctx.admission
        logging.getLogger("kvserve.server").info("draining: %d sequence(s) in flight", admission.in_flight)
        deadline = time.monotonic() + self.timeout
        while admission.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if admission.in_flight > 0:
            self.engine.abort_all()  # their streams end with finish_reason "abort"
            deadline = time.monotonic() + 5
            while admission.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        server.should_exit = True

