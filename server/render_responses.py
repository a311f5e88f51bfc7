"""Engine outputs as an OpenAI Responses `Response`: its output items (a reasoning item, message
items with `output_text` parts, `function_call` items), whole, or as the stream of events OpenAI
documents, each with its `sequence_number`. One ResponseRender writes both from the same blocks
(server/answer.py), so the stream's deltas add up to the object its last event carries."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from engine.core.outputs import CompletionOutput, RequestOutput
from server.answer import AnswerStream, Block, Blocks
from server.context import ServerContext
from server.logprobs import chat_logprobs
from server.prompting import ChatPrompt
from server.protocol_responses import ResponsesRequest
from server.reasoning import END as REASONING_END
from server.render import sse

# how a finish reason ends a response
_STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "abort": "cancelled",
           "error": "failed"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseRender:
    def __init__(self, ctx: ServerContext, body: ResponsesRequest, chat: ChatPrompt) -> None:
        self.ctx, self.body, self.chat = ctx, body, chat
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.answer = AnswerStream(ctx.reasoning, chat.thinking, chat.calls)
        self.blocks = Blocks()
        self.ids: dict[int, str] = {}  # block index -> its output item's id
        self.logprobs: dict[int, list[dict]] = {}  # text block index -> its tokens' logprobs
        self.pending: list[dict] = []  # logprobs of tokens whose text has not yet gone into a text block
        self.token_ids: list[int] = []
        self.num_cached_tokens = 0
        self.status = "in_progress"
        self.error: str | None = None
        self.seq = 0

    # --- the object -------------------------------------------------------------------------
    def response(self) -> dict:
        """The Response as it stands."""
        body, done = self.body, self.status != "in_progress"
        fmt = body.text.format if body.text is not None and body.text.format is not None else None
        out = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": int(time.time()) if self.status == "completed" else None,
            "error": {"code": "server_error", "message": self.error} if self.error is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.ctx.model_name, "output": [self.item(b) for b in self.blocks.blocks],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.stores, "temperature": self.chat.params.temperature, "top_p": self.chat.params.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"},
                     "verbosity": "medium"},
            "tool_choice": _tool_choice(body), "tools": [_tool(t) for t in body.tools or ()],
            "top_logprobs": body.top_logprobs or 0, "truncation": "disabled",
            "metadata": body.metadata or {}, "background": False, "service_tier": "default"}
        if done:
            out["usage"] = self.usage()
        if body.user is not None:
            out["user"] = body.user
        return out

    def usage(self) -> dict:
        prompt, output = len(self.chat.prompt), len(self.token_ids)
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": self.num_cached_tokens, "cache_write_tokens": 0},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": self._reasoning_tokens()},
                "total_tokens": prompt + output}

    def _reasoning_tokens(self) -> int:
        """Tokens up to the one that closes the thinking (all of them if it never closes)."""
        if not self.chat.thinking or self.ctx.reasoning is None:
            return 0
        text = ""
        for n, token in enumerate(self.token_ids, 1):
            text += self.ctx.token_text.text(token)
            if REASONING_END in text:
                return n
        return len(self.token_ids)

    def item(self, block: Block, opened: bool = False) -> dict:
        """The output item of a block as it stands, or (`opened`) as it was when it opened."""
        if opened:
            block = Block(block.kind, block.index, "", block.call_id, block.name)
        done = not opened and (block is not self.blocks.open or self.status != "in_progress")
        status = "completed" if done else "in_progress"
        if self.status == "incomplete" and done and block.index == len(self.blocks.blocks) - 1:
            status = "incomplete"  # the item max_output_tokens cut
        item_id = self.ids.setdefault(block.index, new_id({"reasoning": "rs", "text": "msg", "call": "fc"}[block.kind]))
        if block.kind == "call":
            return {"type": "function_call", "id": item_id, "call_id": block.call_id, "name": block.name,
                    "arguments": block.text, "status": status}
        if block.kind == "reasoning":
            item = {"type": "reasoning", "id": item_id, "summary": [], "content": [self.part(block)],
                    "status": status}
            if "reasoning.encrypted_content" in (self.body.include or ()):
                item["encrypted_content"] = block.text  # not encrypted: the thinking itself, read back as such
            return item
        return {"type": "message", "id": item_id, "role": "assistant", "status": status,
                "content": [self.part(block)]}

    def part(self, block: Block, opened: bool = False) -> dict:
        text = "" if opened else block.text
        if block.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": [] if opened else self.logprobs.get(block.index, [])}

    # --- the engine's outputs -----------------------------------------------------------------
    def feed(self, out: RequestOutput, c: CompletionOutput) -> list[dict]:
        """The stream events for what is new in `c` (all of the answer, for a whole one)."""
        self.token_ids += c.token_ids
        self.num_cached_tokens = out.num_cached_tokens
        if self.body.logprobs and c.logprobs:
            self.pending += chat_logprobs(self.ctx.token_text, c.token_ids, c.logprobs)["content"]
        final = c.finish_reason is not None
        changes = self.blocks.feed(self.answer.feed(c.text, final))
        if final:
            block = self.blocks.open
            if self.pending and block is not None and block.kind == "text":
                changes.append(("delta", block, ""))  # the last tokens' logprobs (they wrote no text)
            changes += self.blocks.close()
            self.status = _STATUS[self.answer.finish_reason(c.finish_reason)]
        return [event for change in changes for event in self._events(*change)]

    def fail(self, message: str) -> dict:
        self.status, self.error = "failed", message
        return self.event("response.failed", response=self.response())

    # --- stream events ------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def opening(self) -> list[dict]:
        return [self.event("response.created", response=self.response()),
                self.event("response.in_progress", response=self.response())]

    def closing(self) -> dict:
        kind = {"completed": "response.completed", "incomplete": "response.incomplete",
                "cancelled": "response.incomplete"}.get(self.status, "response.failed")
        return self.event(kind, response=self.response())

    def _events(self, change: str, block: Block, text: str = "") -> list[dict]:
        where = {"output_index": block.index}
        if change == "open":
            events = [self.event("response.output_item.added", **where, item=self.item(block, opened=True))]
            if block.kind != "call":
                events.append(self.event("response.content_part.added", item_id=self.ids[block.index], **where,
                                         content_index=0, part=self.part(block, opened=True)))
            return events
        item = {"item_id": self.ids[block.index], **where}
        if change == "delta":
            return [self._delta(block, item, text)]
        if block.kind == "call":
            events = [self.event("response.function_call_arguments.done", **item, name=block.name,
                                 arguments=block.text)]
        else:
            kind = "response.reasoning_text.done" if block.kind == "reasoning" else "response.output_text.done"
            extra = {} if block.kind == "reasoning" else {"logprobs": _short(self.logprobs.get(block.index, []))}
            events = [self.event(kind, **item, content_index=0, text=block.text, **extra),
                      self.event("response.content_part.done", **item, content_index=0, part=self.part(block))]
        return events + [self.event("response.output_item.done", **where, item=self.item(block))]

    def _delta(self, block: Block, item: dict, text: str) -> dict:
        if block.kind == "call":
            return self.event("response.function_call_arguments.delta", **item, delta=text)
        if block.kind == "reasoning":
            return self.event("response.reasoning_text.delta", **item, content_index=0, delta=text)
        logprobs, self.pending = self.pending, []  # the tokens up to here wrote this text
        self.logprobs.setdefault(block.index, []).extend(logprobs)
        return self.event("response.output_text.delta", **item, content_index=0, delta=text,
                          logprobs=_short(logprobs))

    async def stream(self, deltas: AsyncIterator[tuple[int, RequestOutput]], on_done) -> AsyncIterator[str]:
        """The SSE body; on_done(response) once it is complete (to store it)."""
        for event in self.opening():
            yield sse(event, event["type"])
        try:
            async for _, out in deltas:
                for event in self.feed(out, out.outputs[0]):
                    yield sse(event, event["type"])
            last = self.closing()
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            last = self.fail(f"engine failure: {e}")
        on_done(last["response"])
        yield sse(last, last["type"])


def _short(logprobs: list[dict]) -> list[dict]:
    """Logprobs as the stream's text events carry them (no bytes)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
            for e in logprobs]


def _tool(tool) -> dict:
    return {"type": "function", "name": tool.name, "description": tool.description, "parameters": tool.parameters,
            "strict": tool.strict}


def _tool_choice(body: ResponsesRequest):
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else {"type": "function", "name": choice.name}
