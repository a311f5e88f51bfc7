"""Engine outputs as an Anthropic Messages `message`: content blocks (`thinking`, `text`,
`tool_use`), whole or as Anthropic's event stream (message_start, content_block_start/delta/stop,
message_delta, message_stop, and a ping while nothing else is sent). One MessageRender writes both
from the same blocks (server/answer.py), so a stream's deltas add up to the whole message."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from engine.core.outputs import CompletionOutput, RequestOutput
from server.answer import AnswerStream, Block, Blocks
from server.context import ServerContext
from server.errors import APIError
from server.prompting import ChatPrompt
from server.render import sse

PING_INTERVAL_S = 5.0  # a stream quiet this long (a long prompt's prefill, a queue) gets a ping
_START = {"reasoning": {"type": "thinking", "thinking": "", "signature": ""}, "text": {"type": "text", "text": ""}}
_DELTA = {"reasoning": ("thinking_delta", "thinking"), "text": ("text_delta", "text"),
          "call": ("input_json_delta", "partial_json")}


class MessageRender:
    def __init__(self, ctx: ServerContext, chat: ChatPrompt) -> None:
        self.ctx, self.chat = ctx, chat
        self.id = f"msg_{uuid.uuid4().hex}"
        self.answer = AnswerStream(ctx.reasoning, chat.thinking, chat.calls)
        self.blocks = Blocks()
        self.output_tokens = 0
        self.cached = 0
        self.stop: tuple[str | None, str | None] = (None, None)  # stop_reason, stop_sequence

    def message(self) -> dict:
        stop_reason, stop_sequence = self.stop
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.ctx.model_name,
                "content": [self.block(b) for b in self.blocks.blocks], "stop_reason": stop_reason,
                "stop_sequence": stop_sequence, "usage": self.usage()}

    def usage(self) -> dict:
        """As Anthropic counts: input_tokens are the prompt's tokens not read from the cache."""
        return {"input_tokens": len(self.chat.prompt) - self.cached, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": self.cached, "output_tokens": self.output_tokens}

    @staticmethod
    def block(block: Block) -> dict:
        if block.kind == "call":
            try:
                arguments = json.loads(block.text or "{}")
            except ValueError:  # cut off by max_tokens mid-call
                arguments = {}
            return {"type": "tool_use", "id": block.call_id, "name": block.name, "input": arguments}
        if block.kind == "reasoning":
            return {"type": "thinking", "thinking": block.text, "signature": ""}  # (nothing to sign here)
        return {"type": "text", "text": block.text}

    def feed(self, out: RequestOutput, c: CompletionOutput) -> list[tuple[str, dict]]:
        """(event name, data) for what is new in `c` (all of the answer, for a whole one)."""
        self.output_tokens += len(c.token_ids)
        self.cached = out.num_cached_tokens
        final = c.finish_reason is not None
        changes = self.blocks.feed(self.answer.feed(c.text, final))
        if final:
            changes += self.blocks.close()
            self.stop = self._stop_reason(c)
        return [self._event(*change) for change in changes]

    def _stop_reason(self, c: CompletionOutput) -> tuple[str, str | None]:
        reason = self.answer.finish_reason(c.finish_reason)
        if reason == "stop" and isinstance(c.stop_reason, str):
            return "stop_sequence", c.stop_reason
        return {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}.get(reason, "pause_turn"), None

    @staticmethod
    def _event(change: str, block: Block, text: str = "") -> tuple[str, dict]:
        if change == "open":
            start = {"type": "tool_use", "id": block.call_id, "name": block.name, "input": {}} \
                if block.kind == "call" else _START[block.kind]
            return "content_block_start", {"type": "content_block_start", "index": block.index,
                                           "content_block": start}
        if change == "delta":
            kind, key = _DELTA[block.kind]
            return "content_block_delta", {"type": "content_block_delta", "index": block.index,
                                           "delta": {"type": kind, key: text}}
        return "content_block_stop", {"type": "content_block_stop", "index": block.index}

    async def stream(self, deltas: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        start = {**self.message(), "content": [], "stop_reason": None, "stop_sequence": None}
        yield sse({"type": "message_start", "message": start}, "message_start")
        yield sse({"type": "ping"}, "ping")
        try:
            async for item in with_pings(deltas, PING_INTERVAL_S):
                if item is None:
                    yield sse({"type": "ping"}, "ping")
                    continue
                out = item[1]
                for name, data in self.feed(out, out.outputs[0]):
                    yield sse(data, name)
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            error = APIError(500, f"engine failure: {e}", type_="internal_server_error")
            yield sse(error.anthropic_body(), "error")
            return
        stop_reason, stop_sequence = self.stop
        yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": self.usage()}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")


async def with_pings(items: AsyncIterator, interval: float) -> AsyncIterator:
    """items, with None put in wherever `interval` seconds pass without one."""
    iterator = aiter(items)
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            pending, finished = None, done.pop()
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:  # cancelling it ends `items` (its own finally runs), then close it
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()
