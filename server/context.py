"""What every route handler works with: the engine and the server's shared parts, built once by
create_app and found by a handler at `request.app.state.ctx` (the `Ctx` dependency)."""
from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from engine.frontend.async_llm import AsyncLLM
from server.errors import APIError, call, invalid_request
from server.guard import ServerOptions
from server.logprobs import TokenIdNames, TokenText
from server.reasoning import ReasoningFormat
from server.store import ResponseStore
from server.tool_calls import ToolFormat


class Offload:
    """Work too heavy for the event loop (parsing big bodies, tokenizing long prompts, chat
    templates) runs on a thread, so /health and other requests' streams keep answering. Small work
    stays inline: each hop to a thread waits for the GIL behind the engine thread, and a burst of
    short requests spread over many hops misses the engine step that would have batched them.
    The thread has its own tokenizer: a Rust tokenizer used from two threads at once can raise
    "Already borrowed"."""

    INLINE_BODY_BYTES = 64 << 10  # parsed in well under a millisecond
    INLINE_CHARS = 4096  # tokenized in a few milliseconds (about 1 us a character here)

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # the event loop's
        self._thread_tokenizer = copy.deepcopy(tokenizer)
        self._parse = ThreadPoolExecutor(1, thread_name_prefix="kvserve-parse")
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="kvserve-tokenize")
        for pool in (self._parse, self._tokenize):
            # Start the threads now: a pool starts its thread at the first task, and Thread.start()
            # then waits for the GIL while that task (a long parse) holds it: the loop stalled ~1 s.
            pool.submit(int).result()

    async def parse(self, raw: Request, model: type[BaseModel]):
        data = await raw.body()
        try:
            if len(data) <= self.INLINE_BODY_BYTES:
                return model.model_validate_json(data)
            return await asyncio.get_running_loop().run_in_executor(self._parse, model.model_validate_json, data)
        except ValidationError as e:
            raise invalid_request(e.errors(include_url=False)) from None

    async def tokenize(self, fn, size: int):
        """fn(tokenizer), inline when `size` (characters or tokens) is small, else on the tokenizer
        thread; its ValueErrors become 400s naming their field."""
        if size <= self.INLINE_CHARS:
            return call(lambda: fn(self.tokenizer))
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize, call, lambda: fn(self._thread_tokenizer))


class Admission:
    """Counts sequences (prompts x n), not HTTP requests: at most max_num_seqs in one request, and
    with --max-queue-len at most max_num_seqs + max_queue_len in flight over all requests."""

    def __init__(self, max_num_seqs: int, max_queue_len: int | None) -> None:
        self.per_request = max_num_seqs
        self.limit = None if max_queue_len is None else max_num_seqs + max_queue_len
        self.in_flight = 0  # sequences admitted and not yet answered

    def check_size(self, num_prompts: int, n: int, name: str = "n") -> None:
        """n: sequences per prompt (its choices, or under beam search its beams, `name` best_of)."""
        if num_prompts * n > self.per_request:
            param, what = (name, f"{name}={n}") if n > 1 else ("prompt", f"{num_prompts} prompts")
            if n > 1 and num_prompts > 1:
                what = f"{num_prompts} prompts x {name}={n}"
            raise APIError(400, f"{param}: {what} asks for {num_prompts * n} sequences; this server runs at most "
                                f"{self.per_request} per request", param=param)

    def admit(self, num_seqs: int) -> None:
        if self.limit is not None and self.in_flight + num_seqs > self.limit:
            raise APIError(503, f"The server is at capacity ({self.in_flight} of {self.limit} sequences in "
                                "flight); retry later.", type_="service_unavailable", headers={"Retry-After": "1"})
        self.in_flight += num_seqs  # the answer gives them back when it is complete

    def release(self, num_seqs: int) -> None:
        self.in_flight -= num_seqs


@dataclass
class ServerContext:
    engine: AsyncLLM
    model_name: str
    options: ServerOptions
    work: Offload
    admission: Admission
    token_text: TokenText
    tool_format: ToolFormat | None  # how the model writes tool calls; None: tools are refused
    reasoning: ReasoningFormat | None  # --reasoning-parser; None: no reasoning split
    responses: ResponseStore  # the Responses API's stored responses

    @property
    def chat_template(self) -> str | None:
        """--chat-template's text; None: the model's own."""
        return self.options.chat_template

    def token_names(self, as_ids: bool) -> TokenText | TokenIdNames:
        """How logprobs name tokens: by their text, or (vLLM's return_tokens_as_token_ids) "token_id:N"."""
        return TokenIdNames(self.token_text) if as_ids else self.token_text

    def check_model(self, asked: str | None) -> None:
        if asked is not None and asked != self.model_name:
            raise APIError(404, f"The model `{asked}` does not exist.", param="model", code="model_not_found")


def _context(request: Request) -> ServerContext:
    return request.app.state.ctx


Ctx = Annotated[ServerContext, Depends(_context)]
