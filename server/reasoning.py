"""Reasoning parsers (vLLM's `--reasoning-parser` names): a reasoning model's thinking segment,
`<think>` ... `</think>`, goes to `reasoning_content`, the answer after it to `content`.

As with tool calls (server/tool_calls.py), one function reads the whole text so far and settles
only what later text cannot change (a trailing `</thi` is held back), so a stream's pieces add up
to the whole answer exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.tool_calls import held

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    # whether `chat_template_kwargs.enable_thinking: false` turns thinking off (the template then
    # closes an empty thinking segment in the prompt, and the whole output is the answer)
    switchable: bool

    def thinks(self, chat_template_kwargs: dict | None) -> bool:
        return not (self.switchable and (chat_template_kwargs or {}).get("enable_thinking") is False)

    def split(self, text: str, final: bool, thinking: bool = True) -> tuple[str, str]:
        """(reasoning, content) of the output so far.

        A `<think>` at the start (after whitespace) is dropped: templates that open the segment in
        the prompt (DeepSeek-R1, Qwen3 thinking models) leave it out of the output, older ones
        leave it in. Without `</think>` everything is reasoning: a complete answer that never
        closed its thinking was cut off mid-thought (vLLM's rule)."""
        if not thinking:
            return "", text
        body = text.lstrip()
        if body.startswith(START):
            body = body[len(START):]
        elif START.startswith(body) and not final:
            return "", ""  # whitespace or a partial `<think>`: nothing settled yet
        else:
            body = text
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END):]
        if not final:
            body = body[:len(body) - held(body, END)]
        return body, ""


FORMATS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ReasoningFormat("deepseek_r1", switchable=False),
    "qwen3": ReasoningFormat("qwen3", switchable=True),
}


class ReasoningStream:
    """One choice's output as it grows: each feed gives what is new in its reasoning and its answer."""

    def __init__(self, fmt: ReasoningFormat, thinking: bool) -> None:
        self.fmt, self.thinking = fmt, thinking
        self.text = ""
        self.sent = (0, 0)  # characters of reasoning and of content given out so far

    def feed(self, piece: str, final: bool) -> tuple[str, str]:
        self.text += piece
        reasoning, content = self.fmt.split(self.text, final, self.thinking)
        new = reasoning[self.sent[0]:], content[self.sent[1]:]
        self.sent = (len(reasoning), len(content))
        return new
