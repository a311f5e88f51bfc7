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

