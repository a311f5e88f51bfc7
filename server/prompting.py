"""From a conversation to checked prompt token ids: the chat template, tools and template
variables, the size bounds before templating, the structured-output grammar. Chat completions,
Responses and Messages all come through here, so a conversation is the same prompt in each."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from engine.core.sampling_params import SamplingParams
from server import templates
from server.context import ServerContext
from server.errors import APIError, call
from server.protocol import ChatCompletionRequest
from server.reasoning import END as REASONING_END
from server.serving import compile_grammar
from server.tool_calls import ToolFormat


@dataclass
class ChatPrompt:
    """A chat request made ready for the engine, and how its answer is to be read."""

    prompt: list[int]
    params: SamplingParams
    calls: ToolFormat | None  # the format of the model's tool calls, when the request lets it call tools
    thinking: bool  # the answer opens with a thinking segment (with a reasoning parser)


async def prepare_chat(ctx: ServerContext, body: ChatCompletionRequest) -> ChatPrompt:
    """ValueErrors (and the template's complaints) become 400s naming the field."""
    params = call(lambda: body.params(ctx.tool_format))
    call(lambda: ctx.engine.check_priority(body.priority))
    kwargs = call(body.template_variables)
    thinking = ctx.reasoning is not None and ctx.reasoning.thinks(kwargs)
    if thinking and params.structured_outputs is not None:  # the thinking is free, the answer held
        params.structured_outputs = dataclasses.replace(params.structured_outputs, start_after=REASONING_END)
    ctx.admission.check_size(1, *width(params))
    await compile_grammar(ctx.engine, params)
    prompt = await chat_prompt_ids(ctx, body, params)
    calls = ctx.tool_format if body.tool_choice_mode() is not None else None
    return ChatPrompt(prompt, params, calls, thinking)


async def chat_prompt_ids(ctx: ServerContext, body: ChatCompletionRequest,
                          params: SamplingParams | None = None) -> list[int]:
    """The conversation through the chat template, as token ids; with `params`, checked against
    them (a prompt and max_tokens beyond the context are a 400)."""
    messages, tools = call(body.message_dicts), body.tool_dicts()
    kwargs, rendering = call(body.template_variables), call(body.rendering)
    size = num_chars(messages, tools) + (len(json.dumps(body.documents)) if body.documents else 0)
    if params is None or params.truncate_prompt_tokens is None:  # (a prompt to be cut may be longer)
        call(lambda: ctx.engine.check_prompt_chars(size))  # before templating megabytes
    template = request_template(ctx, body.chat_template)

    def tokenize(tok) -> list[int]:
        ids = chat_ids(tok, messages, tools, template, kwargs, add_special_tokens=body.add_special_tokens,
                       **rendering)
        return ids if params is None else prompt_ids(ctx, tok, ids, params)

    return await ctx.work.tokenize(tokenize, size)


def width(params: SamplingParams) -> tuple[int, str]:
    """Sequences one prompt runs, and the field that sets them."""
    return params.beam_width, "best_of" if params.use_beam_search else "n"


def num_chars(messages: list[dict], tools: list[dict] | None = None) -> int:
    """The size of a conversation, to bound it before templating (tools count as their JSON)."""
    return (sum(len(m["content"]) + len(m.get("reasoning_content") or "") for m in messages)
            + (len(json.dumps(tools)) if tools else 0))


def request_template(ctx: ServerContext, template: str | None) -> str | None:
    """The chat template a request renders with: its own (where the server trusts requests with
    one), else the server's."""
    if template is None:
        return ctx.chat_template
    if not ctx.options.trust_request_chat_template:
        raise APIError(400, "chat_template: this server runs only its own chat template (start it with "
                       "--trust-request-chat-template to let requests bring theirs)", param="chat_template")
    call(lambda: templates.check(template))
    return template


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, chat_template: str | None = None,
             kwargs: dict | None = None, add_generation_prompt: bool = True, continue_final_message: bool = False,
             documents: list[dict] | None = None, add_special_tokens: bool = False) -> list[int]:
    """kwargs: the request's template variables (chat_template_kwargs). add_special_tokens: the
    tokenizer's own (BOS and the like) around the rendered text, besides those the template writes."""
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=not add_special_tokens, tools=tools, documents=documents, chat_template=chat_template,
            **(kwargs or {}))
    except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {e}", param="messages") from e
    if add_special_tokens:
        return tokenizer.encode(out, add_special_tokens=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def prompt_ids(ctx: ServerContext, tokenizer, prompt: str | list[int], params: SamplingParams,
               add_special_tokens: bool = True) -> list[int]:
    """Tokenize and check a prompt before any generation starts, so errors are plain 400s.
    add_special_tokens: whether a text prompt gets the tokenizer's BOS and the like."""
    return ctx.engine.prepare_prompt(prompt, params, tokenizer, add_special_tokens)
