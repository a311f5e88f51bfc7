"""Anthropic Messages request bodies (`POST /v1/messages`, `/v1/messages/count_tokens`), and their
translation into the chat completion request that runs them (as server/protocol_responses.py
does for Responses).

Content blocks become chat messages: a user turn's `tool_result` blocks become `tool` messages
(before its text), an assistant turn's `tool_use` blocks its `tool_calls` and its `thinking`
blocks its `reasoning_content`. `cache_control` marks are accepted: the prefix cache is automatic.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from engine.core.sampling_params import MAX_STOP_STRINGS
from server.errors import APIError, call, invalid_request, renamed
from server.protocol import MAX_TOOLS, ChatCompletionRequest, FunctionName, StopString, _Strict

# A chat field named in an error -> the Messages field the user set
RENAMED = {"messages": "messages", "max_completion_tokens": "max_tokens", "stop": "stop_sequences",
            "tools": "tools", "tool_choice": "tool_choice", "response_format": "output_config.format"}


class _Block(_Strict):
    cache_control: dict | None = None  # a hint for Anthropic's cache; ours caches every prefix


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: list | None = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: FunctionName
    input: dict


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | Annotated[list[TextBlock], Field(fail_fast=True)] = ""
    is_error: bool | None = None


class ThinkingBlock(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # ours are empty: nothing to verify


class OtherBlock(BaseModel):
    """Images, documents, server-tool results ...: refused by name."""

    model_config = ConfigDict(extra="allow")

    type: str


def _kind(value: Any) -> str | None:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


# (Tags are `kind=name`, which error messages leave out of fields.)
Block = Annotated[Annotated[TextBlock, Tag("block=text")] | Annotated[ToolUseBlock, Tag("block=tool_use")]
                  | Annotated[ToolResultBlock, Tag("block=tool_result")]
                  | Annotated[ThinkingBlock, Tag("block=thinking")] | Annotated[OtherBlock, Tag("block=other")],
                  Discriminator(lambda v: f"block={_kind(v)}" if _kind(v) in ("text", "tool_use", "tool_result",
                                                                               "thinking") else "block=other")]


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(fail_fast=True)]


class Tool(_Strict):
    name: FunctionName
    description: str | None = None
    input_schema: dict
    type: Literal["custom"] | None = None
    cache_control: dict | None = None
    strict: bool | None = None  # the input always follows the schema, strict or not


class ServerTool(BaseModel):
    """A server tool (web_search_..., bash_..., code_execution_...): refused by name."""

    model_config = ConfigDict(extra="allow")

    type: str


ToolParam = Annotated[Annotated[Tool, Tag("tool=custom")] | Annotated[ServerTool, Tag("tool=server")],
                      Discriminator(lambda v: "tool=custom" if _kind(v) in (None, "custom") else "tool=server")]


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: FunctionName | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    # Anthropic's bounds; the thinking is not cut at the budget here: max_tokens bounds the whole answer
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class JsonFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonFormat | None = None


class Metadata(_Strict):
    user_id: str | None = Field(None, max_length=256)


class CountTokensRequest(_Strict):
    model: str
    messages: Annotated[list[Message], Field(min_length=1, fail_fast=True)]
    system: str | Annotated[list[TextBlock], Field(fail_fast=True)] | None = None
    tools: Annotated[list[ToolParam], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # without effect here: cache hints (every prefix is cached), where and how fast Anthropic would run it
    cache_control: dict | None = None
    inference_geo: str | None = None
    speed: Literal["standard"] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion request that runs this one; APIError 400 naming this API's field."""
        self._check()
        body: dict[str, Any] = {"messages": call(lambda: messages(self))}
        body.update(self._chat_fields())
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise renamed(invalid_request(e.errors(include_url=False)), RENAMED) from None

    def _check(self) -> None:
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, ServerTool):
                raise APIError(400, f"tools.{i}.type: server tool {tool.type!r} is not supported by this server "
                                    "(client tools only)", param=f"tools.{i}.type")
        choice = self.tool_choice
        if choice is not None and (choice.type == "tool") != (choice.name is not None):
            raise APIError(400, "tool_choice.name: needed with type 'tool', and only then", param="tool_choice.name")

    def _chat_fields(self) -> dict:
        body: dict[str, Any] = {}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description
                                                                 else {})}} for t in self.tools]
        choice = self.tool_choice
        if choice is not None:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(
                choice.type, {"type": "function", "function": {"name": choice.name}})
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        kwargs = {}
        if self.thinking is not None:  # Qwen3's switch (templates that have none ignore it)
            kwargs["enable_thinking"] = self.thinking.type != "disabled"
        config = self.output_config
        if config is not None and config.effort is not None:
            kwargs["reasoning_effort"] = config.effort
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        if config is not None and config.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                              "schema": config.format.schema_}}
        return body


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS, fail_fast=True)] | None = None
    stream: bool = False
    metadata: Metadata | None = None
    # without effect on the output: one tier here, who asks, and Anthropic's diagnostics (none to report)
    service_tier: Literal["auto", "standard_only"] | None = None
    user_profile_id: str | None = Field(None, max_length=256)
    workspace_id: str | None = Field(None, max_length=256)
    diagnostics: dict | None = None

    def _check(self) -> None:
        super()._check()
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if budget is not None and budget >= self.max_tokens:
            raise APIError(400, "thinking.budget_tokens: must be less than max_tokens", param="thinking.budget_tokens")

    def _chat_fields(self) -> dict:
        body = super()._chat_fields()
        body.update(model=self.model, max_completion_tokens=self.max_tokens)
        for name, chat_name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                                ("stop_sequences", "stop")):
            if getattr(self, name) is not None:
                body[chat_name] = getattr(self, name)
        return body


_ALLOWED = {"user": (TextBlock, ToolResultBlock), "assistant": (TextBlock, ToolUseBlock, ThinkingBlock)}


def messages(request: CountTokensRequest) -> list[dict]:
    """The conversation as chat messages, the system prompt first. ValueError naming a block it
    cannot take."""
    system = request.system
    if isinstance(system, list):
        system = "".join(block.text for block in system)
    out = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(request.messages):
        blocks = message.content if isinstance(message.content, list) else [TextBlock(type="text",
                                                                                      text=message.content)]
        for j, block in enumerate(blocks):
            if not isinstance(block, _ALLOWED[message.role]):
                raise ValueError(f"messages.{i}.content.{j}.type: {block.type!r} blocks in a {message.role} turn are "
                                 "not supported by this server")
            if isinstance(block, TextBlock) and block.citations:
                raise ValueError(f"messages.{i}.content.{j}.citations: not supported by this server")
        out += _user(blocks) if message.role == "user" else [_assistant(blocks)]
    return out


def _user(blocks: list) -> list[dict]:
    """Tool results (each a `tool` message), then the turn's text."""
    out = [{"role": "tool", "tool_call_id": b.tool_use_id, "content": _result(b)}
           for b in blocks if isinstance(b, ToolResultBlock)]
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    return out + [{"role": "user", "content": text}] if text or not out else out


def _result(block: ToolResultBlock) -> str:
    """A tool result's text; a failed call's says so (chat templates have no flag for it)."""
    text = block.content if isinstance(block.content, str) else "".join(t.text for t in block.content)
    return f"Error: {text}" if block.is_error else text


def _assistant(blocks: list) -> dict:
    message = {"role": "assistant", "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
    thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    if thinking:
        message["reasoning_content"] = thinking
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message
