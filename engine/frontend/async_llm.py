"""The engine behind the server: a background thread steps the engine while asyncio serves HTTP.

Requests and aborts reach the worker through a thread-safe inbox and are applied between
steps; each step's outputs go back to the event loop of the request that awaits them.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from engine.core.config import EngineConfig
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.frontend.llm_engine import LLMEngine
from engine.frontend.metrics import STATS_INTERVAL_S, StatsLog

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine worker failed; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """Serving this one request failed (its blocks are freed); the engine serves the others on."""


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        # The engine is built on the thread that steps it: each thread that runs torch ops gets its
        # own OpenMP team, and a loading thread's team competed with the worker's (CPU decode steps
        # were measurably slower when the engine was loaded here and stepped there).
        self.engine: LLMEngine
        built: queue.Queue = queue.Queue()  # the worker puts None once self.engine is set, or the error
        self._worker = threading.Thread(target=self._run, args=(config, built), name="kvserve-engine", daemon=True)
        self._worker.start()
        error = built.get()
        if error is not None:
            raise error

    @classmethod
    def from_options(cls, **options) -> AsyncLLM:
        return cls(EngineConfig.from_kwargs(**options))

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._worker.is_alive()

    # --- what a front end may ask (the server uses these, not the engine behind them) -----
    @property
    def tokenizer(self):
        """For the event loop's thread only: a Rust tokenizer must not be used from two threads."""
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self.engine.hf_config.vocab_size

    @property
    def metrics_registry(self):
        return self.engine.metrics.registry

    def describe(self) -> str:
        return self.engine.describe()

    def check_prompt_chars(self, num_chars: int) -> None:
        self.engine.check_prompt_chars(num_chars)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's structured-output grammar on a thread (ValueError if it cannot be
        compiled), so that neither the event loop nor the engine's step waits for it; generate()
        then finds it compiled."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_outputs)

    def prepare_prompt(self, prompt: str | list[int], params: SamplingParams, tokenizer=None,
                       add_special_tokens: bool = True) -> list[int]:
        """Token ids of the prompt, checked (ValueError); pass them to generate(..., checked=True)."""
        return self.engine.prepare_prompt(prompt, params, tokenizer, add_special_tokens)

    def check_priority(self, priority: int) -> None:
        """ValueError if the scheduling policy does not take this priority."""
        self.engine.check_priority(priority)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, checked: bool = False,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after each step that changed it, as `params.output_kind`
        asks (the whole answer so far, only what is new, or once at the end); abort on exit.
        `checked`: the prompt is token ids from prepare_prompt with these params (not checked again);
        `priority`: under the priority scheduling policy, lower is served first."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running") from self.error
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        if params is not None:
            await self.compile_grammar(params)
        state, _ = self.engine.make_request(request_id, prompt, params, checked, priority)  # ValueError early
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", request_id, state))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ask the worker to stop a request; idempotent, takes effect before the next step."""
        self._inbox.put(("abort", request_id, None))

    def abort_all(self) -> None:
        """Abort every request in the engine (used when draining on shutdown)."""
        self._inbox.put(("abort_all", "", None))

    def shutdown(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", "", None))
        self._worker.join(timeout=10)

    # --- worker thread ------------------------------------------------------------------
    def _run(self, config: EngineConfig, built: queue.Queue) -> None:
        try:
            self.engine = LLMEngine(config)
        except BaseException as e:  # noqa: BLE001 - the constructor re-raises it on its own thread
            built.put(e)
            return
        built.put(None)
        e = self.engine
        stats = None if e.config.disable_log_stats else StatsLog(e.metrics, e.scheduler, e.kv, time.monotonic())
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                for out in self.engine.step():
                    self._deliver(out.request_id, out if out.error is None else RequestFailedError(out.error))
                for line in stats.lines(time.monotonic()) if stats is not None else ():
                    logger.info(line)
        except BaseException as e:
            logger.exception("engine worker failed; no request can be served any more")
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failure: {e}"))
        finally:
            self.engine.close()  # (its tensor-parallel ranks: stopped here, the thread that talks to them)

    def _drain_inbox(self, block: bool) -> None:
        """Apply what the inbox holds; when idle, wait for it (but wake for the stats line)."""
        try:
            item = self._inbox.get(block=block, timeout=STATS_INTERVAL_S if block else None)
            while True:
                self._apply(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, kind: str, request_id: str, state) -> None:
        if kind == "add":
            if request_id not in self._streams:
                return  # its caller already left
            try:
                self.engine.submit(request_id, state)
            except ValueError as e:
                self._deliver(request_id, e)
        elif kind == "abort":
            out = self.engine.abort_request(request_id)
            if out is not None:
                self._deliver(request_id, out)
        elif kind == "abort_all":
            for rid in self.engine.request_ids():
                self._apply("abort", rid, None)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)
