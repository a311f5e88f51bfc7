"""OpenAI Responses request bodies (`POST /v1/responses`), and their translation into the chat
completion request that runs them: one engine path, so a conversation is the same prompt and the
same sampling on either route.

Input items become chat messages: `message` items as they are (text parts joined), `function_call`
items as an assistant message's `tool_calls`, `function_call_output` items as `tool` messages,
`reasoning` items as the `reasoning_content` of the assistant message that follows them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from engine.core.sampling_params import MAX_LOGPROBS, MAX_TEMPERATURE
from server.errors import APIError, call, invalid_request, renamed
from server.protocol import MAX_TOOLS, ChatCompletionRequest, FunctionName, _Strict, check_supported

# Fields of chat completions a Responses request may carry too (vLLM's extras: sampling beyond
# temperature and top_p, template variables); they are checked as chat checks them.
CHAT_EXTRAS = frozenset({
    "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias",
    "stop", "stop_token_ids", "ignore_eos", "min_tokens", "chat_template_kwargs"})
# A chat field named in an error -> the Responses field the user set
RENAMED = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
            "tools": "tools", "tool_choice": "tool_choice"}
INCLUDABLE = ("message.output_text.logprobs", "reasoning.encrypted_content")
MAX_METADATA_KEYS = 16  # as OpenAI: 16 pairs, keys up to 64 characters, values up to 512
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=MAX_METADATA_KEYS)]


class TextPart(BaseModel):
    """A text part (an output_text part's annotations and logprobs come back as they went)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["input_text", "output_text", "summary_text", "reasoning_text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


def _kind(value: Any, default: str | None = None) -> str:
    kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
    return kind if isinstance(kind, str) else ""


# The kinds of content this server reads; any other kind (images, files, audio) is refused by the
# text part's check of its type. (Tags are `kind=name`, which error messages leave out of fields.)
Part = Annotated[Annotated[TextPart, Tag("part=text")] | Annotated[RefusalPart, Tag("part=refusal")],
                 Discriminator(lambda v: "part=refusal" if _kind(v) == "refusal" else "part=text")]


def text_of(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(
        part.refusal if isinstance(part, RefusalPart) else part.text for part in content)


Content = str | Annotated[list[Part], Field(fail_fast=True)]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: FunctionName
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Content
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Part] = Field(default_factory=list, fail_fast=True)
    content: Annotated[list[Part], Field(fail_fast=True)] | None = None
    encrypted_content: str | None = None  # ours is the reasoning text itself (see README)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return text_of(self.content) if self.content else self.encrypted_content or text_of(self.summary)


InputItem = Annotated[Annotated[MessageItem, Tag("item=message")]
                      | Annotated[FunctionCallItem, Tag("item=function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("item=function_call_output")]
                      | Annotated[ReasoningItem, Tag("item=reasoning")],
                      Discriminator(lambda v: f"item={_kind(v, 'message')}")]  # (a message may leave out its type)


class FunctionTool(_Strict):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class OtherTool(BaseModel):
    """A hosted tool (web_search, file_search, ...): refused by name."""

    model_config = ConfigDict(extra="allow")

    type: str


Tool = Annotated[Annotated[FunctionTool, Tag("tool=function")] | Annotated[OtherTool, Tag("tool=other")],
                 Discriminator(lambda v: "tool=function" if _kind(v) == "function" else "tool=other")]


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextParam(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningParam(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    # summaries are not written: a reasoning item's summary stays empty, its `content` holds the thinking
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None


# Known fields of the API that this server does not implement: set to anything but these values, a 400
_UNSUPPORTED: dict[str, tuple] = {
    "background": (None, False), "conversation": (None,), "prompt": (None,), "max_tool_calls": (None,),
    "context_management": (None,), "moderation": (None,), "prompt_cache_options": (None,),
    "prompt_cache_retention": (None, "in_memory"), "truncation": (None, "disabled")}


def _document_extras(schema: dict) -> None:
    """The schema /openapi.json shows: chat's extras are fields here too (as chat documents them), and
    nothing else is."""
    chat = ChatCompletionRequest.model_json_schema()["properties"]
    schema["properties"].update({name: chat[name] for name in sorted(CHAT_EXTRAS)})
    schema["additionalProperties"] = False


class ResponsesRequest(BaseModel):
    # Extra fields are chat's sampling extras (CHAT_EXTRAS, checked by the chat request) or refused.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True, json_schema_extra=_document_extras)

    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1, fail_fast=True)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | dict | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    store: bool | None = None  # None: true, as OpenAI
    previous_response_id: str | None = Field(None, max_length=256)
    metadata: Metadata | None = None
    include: Annotated[list[Literal[INCLUDABLE]], Field(max_length=8)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # without effect on the output: who asks, and OpenAI's bookkeeping (the prefix cache is automatic)
    user: str | None = None
    safety_identifier: str | None = Field(None, max_length=64)
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    context_management: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    truncation: Any = None

    def check(self) -> None:
        """The 400s pydantic cannot give: unknown fields, fields not implemented, hosted tools."""
        for name in self.model_extra or {}:
            if name not in CHAT_EXTRAS:
                raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
        call(lambda: check_supported(self, _UNSUPPORTED))
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, OtherTool):
                raise APIError(400, f"tools.{i}.type: hosted tool {tool.type!r} is not supported by this server "
                                    "(function tools only)", param=f"tools.{i}.type")
        if isinstance(self.tool_choice, dict):
            raise APIError(400, "tool_choice: only 'none', 'auto', 'required' or a function "
                                "({\"type\": \"function\", \"name\": ...}) are supported", param="tool_choice")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise APIError(400, "text.verbosity: not supported by this server (only 'medium')",
                           param="text.verbosity")
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            raise APIError(400, "stream_options.include_obfuscation: not supported by this server",
                           param="stream_options.include_obfuscation")

    @property
    def stores(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    def input_items(self) -> list[BaseModel]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    def chat_request(self, history: list[BaseModel]) -> ChatCompletionRequest:
        """The chat completion request that runs this one, after `history` (the items of the
        previous responses, oldest first). APIError 400 naming this API's field."""
        body: dict[str, Any] = {"messages": messages(history, self), **(self.model_extra or {})}
        for name in ("model", "temperature", "top_p", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            body["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                          "function": {"name": choice.name}}
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            body["response_format"] = _response_format(fmt)
        if self.reasoning is not None and self.reasoning.effort is not None:  # as vLLM: a template variable
            kwargs = dict(body.get("chat_template_kwargs") or {})
            kwargs.setdefault("reasoning_effort", self.reasoning.effort)
            body["chat_template_kwargs"] = kwargs
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise renamed(invalid_request(e.errors(include_url=False)), RENAMED) from None


def _response_format(fmt: TextFormat) -> dict:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None:
        raise APIError(400, "text.format.name: needed when type is 'json_schema'", param="text.format.name")
    schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def messages(history: list[BaseModel], request: ResponsesRequest) -> list[dict]:
    """The conversation as chat messages: instructions (this request's only: they are not carried
    over from earlier responses), then the earlier items, then this request's input."""
    out = [{"role": "system", "content": request.instructions}] if request.instructions else []
    thinking = None  # the reasoning item waiting for the assistant message it belongs to
    for item in history + request.input_items():
        if isinstance(item, ReasoningItem):
            thinking = item.text()
            continue
        message = _message(item)
        last = out[-1] if out else None
        if "tool_calls" in message and thinking is None and last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).extend(message["tool_calls"])  # one turn's calls: one message
            continue
        if thinking is not None:
            if message["role"] == "assistant":
                message["reasoning_content"] = thinking
            else:
                out.append({"role": "assistant", "content": "", "reasoning_content": thinking})
            thinking = None
        out.append(message)
    if thinking is not None:
        out.append({"role": "assistant", "content": "", "reasoning_content": thinking})
    return out


def _message(item: BaseModel) -> dict:
    """A message, call or call output item as a chat message."""
    if isinstance(item, MessageItem):
        return {"role": item.role, "content": text_of(item.content)}
    if isinstance(item, FunctionCallOutputItem):
        return {"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output)}
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}
