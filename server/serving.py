"""Running a request's prompts on the engine, the same for every protocol: admission, abort on
disconnect, and the two ways an answer leaves (whole, or as a stream of events)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.frontend.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from server.context import ServerContext
from server.errors import APIError, param_of

logger = logging.getLogger("kvserve.server")


@dataclasses.dataclass
class Run:
    """One request's work for the engine: its prompts (token ids, checked) and their params."""

    ctx: ServerContext
    raw: Request
    prompts: list[list[int]]
    params: SamplingParams
    name: str | None = None  # the body's request_id (vLLM's), else the X-Request-Id header's, else random
    user: str | None = None  # who asks (safety_identifier, or user), for the log
    priority: int = 0  # under the priority scheduling policy: lower first
    request_id: str = ""  # the engine's: the name and a suffix of its own

    def __post_init__(self) -> None:
        self.name = self.name or self.raw.state.request_id
        self.request_id = f"{self.name}-{uuid.uuid4().hex[:8]}"  # client ids may repeat

    @property
    def num_seqs(self) -> int:
        return len(self.prompts) * self.params.beam_width

    def log(self, stream: bool) -> None:
        who = "" if self.user is None else f", user={self.user[:64]!r}"
        logger.info("request %s: %d prompt(s), n=%d, max_tokens=%s, stream=%s%s", self.request_id, len(self.prompts),
                    self.params.n, self.params.max_tokens, stream, who)

    async def whole(self) -> dict[int, RequestOutput]:
        """Each prompt's final output (by prompt index), once all are done."""
        self.params = dataclasses.replace(self.params, output_kind="final")  # one output, at the end
        self.log(stream=False)
        admission = self.ctx.admission
        admission.admit(self.num_seqs)
        try:
            return await _until_disconnect(self.raw, _collect(self.ctx.engine, self.prompts, self.params,
                                                              self.request_id, self.priority))
        finally:
            admission.release(self.num_seqs)

    def stream(self, events: Callable[[AsyncIterator[tuple[int, RequestOutput]]], AsyncIterator[str]]
               ) -> StreamingResponse:
        """A streaming response whose body is events(what is new in each prompt's output, as it comes)."""
        self.params = dataclasses.replace(self.params, output_kind="delta")  # what is new at each step
        self.log(stream=True)
        admission = self.ctx.admission
        admission.admit(self.num_seqs)
        release = functools.partial(admission.release, self.num_seqs)
        deltas = outputs(self.ctx.engine, self.prompts, self.params, self.request_id, self.priority)
        # Starlette cancels the body iterator when the client goes: that aborts the requests
        return _ReleasingStream(events(deltas), release=release, media_type="text/event-stream")


async def compile_grammar(engine: AsyncLLM, params: SamplingParams) -> None:
    """A schema, regex or grammar that does not compile is a 400 before anything runs."""
    try:
        await engine.compile_grammar(params)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(str(e))) from e


async def outputs(engine: AsyncLLM, prompts: list[list[int]], params: SamplingParams,
                  request_id: str, priority: int = 0) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run every prompt at once; yield (prompt index, output) as they come. Leaving aborts all."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        try:
            async for out in engine.generate(ids, params, f"{request_id}-{i}", checked=True, priority=priority):
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


async def _collect(engine, prompts, params, request_id, priority) -> dict[int, RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    try:
        async for i, out in outputs(engine, prompts, params, request_id, priority):
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
