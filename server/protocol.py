"""OpenAI request bodies (pydantic) and their translation into SamplingParams."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core.sampling_params import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_BAD_WORDS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_LOGPROBS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    SEED_RANGE,
    SamplingParams,
    StructuredOutputs,
)
from server.tool_calls import ToolFormat

# Fields the API knows and this server does not implement yet: a request that sets one to anything
# but its "off" value gets a 400 saying so (the value each field may safely have is listed).
_UNSUPPORTED: dict[str, tuple] = {
    "functions": (None, []), "function_call": (None, "none"),
    "audio": (None,), "prediction": (None,), "web_search_options": (None,),
    "suffix": (None, ""), "store": (None, False),
}


def check_supported(body: BaseModel, unsupported: dict[str, tuple]) -> None:
    """ValueError naming the first field of `unsupported` (name -> the values it may safely have)
    that `body` sets to anything else."""
    for name, off in unsupported.items():
        if name in body.model_fields_set and getattr(body, name) not in off:
            raise ValueError(f"{name}: not supported by this server yet")


class _Strict(BaseModel):
    """Unknown fields are refused (400 "Unrecognized request argument supplied"), values must have
    the type the schema gives (no "16" for 16, no 0 for false), and NaN and the infinities, which
    JSON parsers here accept as `NaN` and `Infinity`, are refused too."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


# The static bounds, here so that /openapi.json states them; SamplingParams.validate checks the
# same (from the same constants) for the offline API, and the engine those set by the model.
# Lists stop at their first bad item (fail_fast): pydantic otherwise records an error per item, and
# in a union for every member that is a list, so a long list of token ids took several times longer
# to validate (holding the GIL: every stream paused) and a bad one built an error per token.
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with the request's usage and no choices
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    json_: dict | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(fail_fast=True)] | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None


class SamplingFields(_Strict):
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS, fail_fast=True)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    # accepted and without effect on the output: who asks, and OpenAI's billing and bookkeeping fields
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # beam search (vLLM's names, transformers' semantics): best_of beams, the n best returned
    use_beam_search: bool = False
    best_of: int | None = Field(None, ge=1)
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # contrastive search (transformers' name): top_k candidates, scored against the history
    penalty_alpha: float = Field(0.0, ge=0.0, le=1.0)
    response_format: ResponseFormat | None = None
    # vLLM's structured outputs, and their older names
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(fail_fast=True)] | None = None
    guided_grammar: str | None = None
    # OpenAI's newer fields. prompt_cache_key: a hint for a router in front (requests that share a
    # prefix share a key); the prefix cache here finds shared prefixes by itself. safety_identifier:
    # who asks, logged as `user` is
    prompt_cache_key: str | None = Field(None, max_length=1024)
    safety_identifier: str | None = Field(None, max_length=1024)
    # known, not implemented yet: see _UNSUPPORTED
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    suffix: Any = None
    store: Any = None
    # vLLM extras
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS, fail_fast=True)] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool | None = None  # None: as the tokenizer decodes
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # keep the last k prompt tokens (-1: the context)
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS,
                                                      fail_fast=True)] | None = None
    bad_words: Annotated[list[StopString], Field(max_length=MAX_BAD_WORDS, fail_fast=True)] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    # the answer's id (after "cmpl-"/"chatcmpl-"), and the request's in the logs
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    guided_decoding_backend: Literal["auto", "xgrammar"] | None = None  # the one structured-output engine here
    priority: int = Field(0, ge=-(1 << 63), lt=1 << 63)  # with --scheduling-policy priority: lower first

    def sampling_params(self, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, tools: StructuredOutputs | None = None) -> SamplingParams:
        """Raises ValueError naming the offending field. `tools`: the grammar of the tool calls
        asked for, if any (chat only)."""
        self._check_supported()
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise ValueError("logit_bias: keys must be token ids") from None
        # beams and contrastive search choose greedily
        default_temperature = 0.0 if self.use_beam_search or self.penalty_alpha else 1.0
        return SamplingParams(
            n=self.n, temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logprobs=logprobs, prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            logit_bias=bias or None,
            structured_outputs=self._structured_outputs(tools), use_beam_search=self.use_beam_search,
            best_of=self.best_of, length_penalty=self.length_penalty, early_stopping=self.early_stopping,
            penalty_alpha=self.penalty_alpha, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            truncate_prompt_tokens=self.truncate_prompt_tokens, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words)

    def _structured_outputs(self, tools: StructuredOutputs | None) -> StructuredOutputs | None:
        """What tool_choice, response_format, structured_outputs or a guided_* field asks for (one at most)."""
        asked = [tools] if tools is not None else []
        fmt = self.response_format
        if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
            raise ValueError(f"response_format.json_schema: only with type 'json_schema' (type is {fmt.type!r})")
        if fmt is not None and fmt.type == "json_object":
            asked.append(StructuredOutputs(json_object=True, field="response_format"))
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ValueError("response_format.json_schema: needed when type is 'json_schema'")
            schema = fmt.json_schema.schema_
            asked.append(StructuredOutputs(json=schema, field="response_format") if schema is not None
                         else StructuredOutputs(json_object=True, field="response_format"))
        so = self.structured_outputs
        if so is not None:
            asked.append(StructuredOutputs(json=so.json_, json_object=bool(so.json_object), regex=so.regex,
                                           choice=so.choice, grammar=so.grammar, structural_tag=so.structural_tag,
                                           field="structured_outputs"))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked.append(StructuredOutputs(**{kind: getattr(self, name)}, field=name))
        if len(asked) > 1:
            raise ValueError(f"{asked[1].field}: only one of tool calls, response_format, structured_outputs and "
                             "guided_* may constrain the output")
        return asked[0] if asked else None

    def _check_supported(self) -> None:
        check_supported(self, _UNSUPPORTED)
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not available when streaming (as vLLM)")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def who(self) -> str | None:
        return self.safety_identifier or self.user

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, fail_fast=True)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, fail_fast=True)])
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True  # the tokenizer's BOS and the like around a text prompt

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: score the prompt, generate nothing (as lm-eval-style clients ask)."""
        return self.echo and self.max_tokens == 0

    def params(self) -> SamplingParams:
        # A prompt-only request still samples one token (that is how the prompt gets computed); it is dropped.
        max_tokens = 1 if self.prompt_only else self.max_tokens
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:  # the echoed prompt's logprobs
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):  # the schema's union is of homogeneous lists: one token-id prompt
            return [p]
        return list(p)


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported (others get a 400)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


MAX_TOOLS = 128  # as OpenAI
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # the arguments always follow the schema, strict or not


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


# apply_chat_template's own parameters, and what a request sets through its own fields: given as
# template variables they would change how the conversation is rendered or tokenized
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
TemplateKwargs = Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Any],
                           Field(max_length=32)]


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs (e.g. {"enable_thinking": false}) as variables for the chat template."""
    for key in kwargs or {}:
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"chat_template_kwargs.{key}: is not a template variable a request may set")
    return dict(kwargs or {})


class FunctionRef(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionRef


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the API returned it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[ContentPart], Field(fail_fast=True)] | None = None
    name: str | None = None  # handed to the chat template
    tool_call_id: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None  # an earlier assistant turn's
    reasoning_content: str | None = None  # an earlier assistant turn's thinking (templates that show it read it)
    # fields of earlier assistant turns: accepted while empty
    function_call: dict | None = None
    refusal: str | None = None
    audio: dict | None = None
    annotations: list | None = None

    def as_dict(self, i: int) -> dict:
        """The message as the chat template takes it; ValueError naming the field it cannot take."""
        for name in ("function_call", "refusal", "audio", "annotations"):
            if getattr(self, name):
                raise ValueError(f"messages.{i}.{name}: not supported by this server yet")
        content = self.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise ValueError(f"messages.{i}.content.{j}.type: content of type {part.type!r} is not "
                                     "supported by this server (text only)")
                if part.text is None:
                    raise ValueError(f"messages.{i}.content.{j}.text: a text part needs its text")
            content = "".join(part.text for part in content)
        out = {"role": self.role, "content": content or ""}
        out.update({k: getattr(self, k) for k in ("name", "tool_call_id") if getattr(self, k) is not None})
        if self.reasoning_content is not None:
            if self.role != "assistant":
                raise ValueError(f"messages.{i}.reasoning_content: only assistant messages think")
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            if self.role != "assistant":
                raise ValueError(f"messages.{i}.tool_calls: only assistant messages make tool calls")
            out["tool_calls"] = [self._call(i, j, c) for j, c in enumerate(self.tool_calls)]
        return out

    @staticmethod
    def _call(i: int, j: int, call: ToolCall) -> dict:
        """As chat templates take a call: the arguments as an object (templates write them with tojson)."""
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            raise ValueError(f"messages.{i}.tool_calls.{j}.function.arguments: must be JSON text") from None
        return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    return [m.as_dict(i) for i, m in enumerate(messages)]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    modalities: list[Literal["text"]] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    # vLLM's: how the conversation is rendered
    add_generation_prompt: bool = True  # open the assistant's turn after the last message
    continue_final_message: bool = False  # leave the last (assistant) message open: the answer continues it
    echo: bool = False  # the answer begins with the last message's text, where its role is the answer's
    chat_template: str | None = Field(None, min_length=1, max_length=1 << 16)  # with --trust-request-chat-template
    documents: Annotated[list[dict[str, str]], Field(max_length=64)] | None = None  # for templates that show them
    add_special_tokens: bool = False  # the tokenizer's BOS and the like, besides the template's own
    # template variables, as vLLM passes them: templates that read them use them
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    def params(self, tool_format: ToolFormat | None = None) -> SamplingParams:
        """`tool_format`: how the served model writes tool calls (None: the server knows no format)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        grammar = self._tool_grammar(tool_format)
        params = self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, tools=grammar)
        if grammar is not None and tool_format.name == "mistral":
            params.skip_special_tokens = False  # [TOOL_CALLS] is a special token the parser must see
        return params

    def tool_choice_mode(self) -> str | None:
        """None (no calls may be made), "auto", "required", or the one function's name."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise ValueError("tool_choice: needs tools")
            return None
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice: no tool in tools is named {choice.function.name!r}")
            return choice.function.name
        return None if choice == "none" else choice or "auto"

    def tool_dicts(self) -> list[dict] | None:
        """The tools as the chat template takes them (also with tool_choice "none": the model sees them)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def _tool_grammar(self, tool_format: ToolFormat | None) -> StructuredOutputs | None:
        mode = self.tool_choice_mode()
        if mode is None:
            return None
        if tool_format is None:
            raise ValueError("tools: this server knows no tool-call format for its chat template; start it with "
                             "--tool-call-parser (and a --chat-template that shows the model its tools)")
        functions = [t.function.model_dump(exclude_none=True) for t in self.tools]
        if mode not in ("auto", "required"):
            functions = [f for f in functions if f["name"] == mode]
        parallel = self.parallel_tool_calls is not False
        return StructuredOutputs(structural_tag=tool_format.grammar(functions, mode, parallel), field="tools")

    def message_dicts(self) -> list[dict]:
        return message_dicts(self.messages)

    def template_variables(self) -> dict[str, Any]:
        """chat_template_kwargs, with reasoning_effort and verbosity where set (a variable of the same
        name in chat_template_kwargs wins, as it is the more specific)."""
        variables = template_kwargs(self.chat_template_kwargs)
        for name in ("reasoning_effort", "verbosity"):
            if getattr(self, name) is not None:
                variables.setdefault(name, getattr(self, name))
        if self.reasoning_effort == "none":  # as vLLM: templates with a thinking switch turn it off
            variables.setdefault("enable_thinking", False)
        return variables

    def rendering(self) -> dict[str, Any]:
        """How apply_chat_template renders this conversation (ValueError naming a field at fault)."""
        if self.continue_final_message:
            if "add_generation_prompt" in self.model_fields_set and self.add_generation_prompt:
                raise ValueError("continue_final_message: cannot be combined with add_generation_prompt true")
            if self.messages[-1].role != "assistant":
                raise ValueError("continue_final_message: the last message must be the assistant's")
        return {"add_generation_prompt": self.add_generation_prompt and not self.continue_final_message,
                "continue_final_message": self.continue_final_message, "documents": self.documents}

    def echoed(self) -> str | None:
        """With echo: the last message's text, where its role is the answer's (as vLLM)."""
        if not self.echo:
            return None
        last = self.messages[-1]
        role = "assistant" if self.rendering()["add_generation_prompt"] else last.role
        return last.as_dict(len(self.messages) - 1)["content"] if last.role == role else None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, fail_fast=True)
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: Annotated[list[TokenId], Field(fail_fast=True)]
