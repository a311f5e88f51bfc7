"""One answer of a chat-like request read as it grows: a reasoning model's thinking, the text, and
the tool calls the model writes, each settled only when later text cannot change it (see
server/reasoning.py and server/tool_calls.py). Every protocol renders from these pieces, so chat
completions, Responses and Messages split an answer alike, whole or streamed."""
from __future__ import annotations

from dataclasses import dataclass, field

from server.reasoning import ReasoningFormat, ReasoningStream
from server.tool_calls import ToolCallStream, ToolFormat, finish_reason


@dataclass
class Piece:
    """What one feed settled."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)  # OpenAI `delta.tool_calls` entries: id and name once, then
    # argument pieces, each with the call's index


class AnswerStream:
    """reasoning: the reasoning parser, if any, and `thinking` whether this answer opens with
    thinking; tools: the format of the model's tool calls when the request lets it call tools."""

    def __init__(self, reasoning: ReasoningFormat | None, thinking: bool, tools: ToolFormat | None) -> None:
        self.thoughts = ReasoningStream(reasoning, thinking) if reasoning is not None else None
        self.calls = ToolCallStream(tools) if tools is not None else None

    def feed(self, text: str, final: bool) -> Piece:
        thought, calls = "", []
        if self.thoughts is not None:
            thought, text = self.thoughts.feed(text, final)
        if self.calls is not None:
            text, calls = self.calls.feed(text, final)
        return Piece(thought, text, calls)

    @property
    def made_calls(self) -> bool:
        return self.calls is not None and bool(self.calls.ids)

    def tool_calls(self) -> list[dict]:
        """Every call so far, as chat's `message.tool_calls` holds them (id, type, function name and arguments)."""
        return self.calls.tool_calls() if self.calls is not None else []

    def finish_reason(self, reason: str | None) -> str | None:
        """A complete answer that made calls ends with "tool_calls" (a cut one keeps "length")."""
        return finish_reason(reason, self.calls) if self.calls is not None else reason


@dataclass
class Block:
    """One part of an answer, in the order the model wrote them: its thinking, a run of text, or
    one tool call (`text` then holds its arguments, JSON text as far as it has come)."""

    kind: str  # "reasoning" | "text" | "call"
    index: int  # its place among the answer's blocks
    text: str = ""
    call_id: str | None = None
    name: str | None = None


class Blocks:
    """An answer's pieces as a list of blocks, one open at a time, for the protocols whose answers
    are lists (Responses' output items, Messages' content blocks). feed() gives what happened to
    the blocks: ("open", block), ("delta", block, text) and ("close", block), in order."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.open: Block | None = None
        self._calls: dict[int, Block] = {}  # a Piece's call index -> its block

    def feed(self, piece: Piece) -> list[tuple]:
        """In the order the text can hold them: thinking, the rest of a call under way, text, new calls."""
        events: list[tuple] = []
        if piece.reasoning:
            events += self._add("reasoning", piece.reasoning)
        new_calls = [call for call in piece.calls if "id" in call]
        for call in piece.calls:
            if "id" not in call:
                events += self._extend(self._calls[call["index"]], call["function"]["arguments"])
        if piece.content:
            events += self._add("text", piece.content)
        for call in new_calls:  # its id and name come once, with its first arguments
            events += self._start(Block("call", len(self.blocks), "", call["id"], call["function"]["name"]))
            self._calls[call["index"]] = self.open
            if call["function"]["arguments"]:
                events += self._extend(self.open, call["function"]["arguments"])
        return events

    def close(self) -> list[tuple]:
        """The events that end the open block, if any (the answer is complete)."""
        block, self.open = self.open, None
        return [("close", block)] if block is not None else []

    def _add(self, kind: str, text: str) -> list[tuple]:
        events = []
        if self.open is None or self.open.kind != kind:
            events += self._start(Block(kind, len(self.blocks)))
        return events + self._extend(self.open, text)

    def _start(self, block: Block) -> list[tuple]:
        events = self.close()
        self.blocks.append(block)
        self.open = block
        return events + [("open", block)]

    @staticmethod
    def _extend(block: Block, text: str) -> list[tuple]:
        block.text += text
        return [("delta", block, text)]
