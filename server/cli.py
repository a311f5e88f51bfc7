"""`kvserve serve [MODEL] [flags]` (flag names as vLLM's)."""
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
from server import templates
from server.guard import ServerOptions, header_deadline_protocol
from server.reasoning import FORMATS as REASONING_FORMATS
from server.tool_calls import PARSERS


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action) -> str:  # no "(default: None)": the help says what None means
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A small OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=f"kvserve {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="load a model and serve it",
                       formatter_class=_Help)
    s.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                   help="the model, as --model (`kvserve serve MODEL` as `vllm serve MODEL`)")
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
    s.add_argument("--limit-concurrency", type=int, default=2048,
                   help="open connections and tasks beyond which new requests get 503 at once")
    s.add_argument("--chat-template", default=None,
                   help="a Jinja chat template in place of the model's own: a file, the name of one shipped in "
                        f"the package ({', '.join(templates.shipped())}), or the template itself (default: the "
                        "model's own, or where that shows no tools the shipped one that renders the same and "
                        "also shows tools, as smollm2_tool_use for SmolLM2)")
    s.add_argument("--tool-call-parser", default="auto", choices=("auto", *PARSERS),
                   help="how the model writes tool calls; auto: the one format the chat template shows, if any")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag: tool_choice auto is always on where the tool-call format is known; with this "
                        "flag the start fails if it is not")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests bring their own chat_template (Jinja run on the server); refused otherwise")
    s.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_FORMATS),
                   help="split a reasoning model's <think>...</think> segment into reasoning_content; "
                        "structured outputs and tool grammars then apply after it (default: off)")
    s.add_argument("--responses-store-size", type=int, default=ServerOptions.responses_store_size,
                   help="stored responses (the Responses API's store: true) kept in memory for previous_response_id "
                        "and GET /v1/responses/{id}, least recently used first out; lost on restart (0: none)")
    s.add_argument("--allowed-origins", type=_json_list, default=[],
                   help='CORS: origins browsers may call from, a JSON list (["*"] any; default: none)')
    s.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: methods allowed, a JSON list")
    s.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: headers allowed, a JSON list")
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kvserve")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _json_list(text: str) -> list[str]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings (got {text!r})")
    return value


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
    """ValueError naming the field at fault."""
    tag = getattr(args, "model_tag", None)
    if tag is not None and args.model is not None and args.model != tag:
        raise ValueError(f"model: given twice, as {tag!r} and --model {args.model!r}")
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig)}
    return EngineConfig(**{**values, "model": tag or args.model}).validate()


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

    try:
        _check_server_flags(args)
        template = templates.resolve(args.chat_template) if args.chat_template is not None else None
    except ValueError as e:
        print(f"kvserve: {e}", file=sys.stderr)
        return 2
    options = ServerOptions(api_key=args.api_key or None, max_queue_len=args.max_queue_len,
                            max_body_bytes=args.max_request_body, shutdown_timeout=args.shutdown_timeout,
                            body_read_timeout=args.body_read_timeout, chat_template=template,
                            tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                            responses_store_size=args.responses_store_size,
                            trust_request_chat_template=args.trust_request_chat_template,
                            allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
                            allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
    _raise_open_files_limit(args.limit_concurrency)
    engine = AsyncLLM(config)
    print(engine.describe(), flush=True)
    app = create_app(engine, engine.model_name, options)
    ctx = app.state.ctx
    fmt = ctx.tool_format
    if ctx.options.chat_template_name is not None:
        print(f"kvserve: chat template: {ctx.options.chat_template_name} (shipped; renders as the model's own and "
              "also shows tools)", flush=True)
    print(f"kvserve: tool calls: {fmt.name if fmt else 'off (no --tool-call-parser, none in the chat template)'}",
          flush=True)
    if args.enable_auto_tool_choice and fmt is None:
        print("kvserve: enable_auto_tool_choice: no tool-call format is known for this chat template; give "
              "--tool-call-parser and a --chat-template that shows the model its tools", file=sys.stderr)
        engine.shutdown()
        return 2
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


def _raise_open_files_limit(connections: int) -> None:
    """Each connection holds a file descriptor, and a shell's soft limit is often 1024: raised
    toward the hard limit (as vLLM does) so that --limit-concurrency, not the kernel, turns the
    excess away, with a 503."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024  # and the model's files, the tokenizer threads, the ranks' pipes
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _check_server_flags(args: argparse.Namespace) -> None:
    """ValueError naming the first server flag out of range."""
    if args.max_queue_len is not None and args.max_queue_len < 0:
        raise ValueError("max_queue_len: must be non-negative")
    if not 0 <= args.responses_store_size <= 1 << 20:
        raise ValueError("responses_store_size: must be in [0, 1048576]")
    for name in ("timeout_keep_alive", "header_read_timeout", "body_read_timeout", "limit_concurrency"):
        if getattr(args, name) <= 0:
            raise ValueError(f"{name}: must be positive")


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

