"""vLLM's `/tokenize` (a prompt, or a conversation through the chat template) and `/detokenize`."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import Ctx
from server.errors import APIError, call
from server.prompting import chat_ids, num_chars
from server.protocol import DetokenizeRequest, TokenizeRequest, message_dicts, template_kwargs

router = APIRouter()


@router.post("/tokenize")
async def tokenize(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, TokenizeRequest)
    ctx.check_model(body.model)
    engine = ctx.engine
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        messages = call(lambda: message_dicts(body.messages))
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        kwargs = call(lambda: template_kwargs(body.chat_template_kwargs))
        size = num_chars(messages, tools)
        call(lambda: engine.check_prompt_chars(size))
        template = ctx.chat_template
        ids = await ctx.work.tokenize(
            lambda tok: chat_ids(tok, messages, tools, template, kwargs, body.add_generation_prompt), size)
    else:
        call(lambda: engine.check_prompt_chars(len(body.prompt)))
        ids = await ctx.work.tokenize(lambda tok: tok.encode(body.prompt, add_special_tokens=body.add_special_tokens),
                                      len(body.prompt))
    return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}


@router.post("/detokenize")
async def detokenize(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, DetokenizeRequest)
    ctx.check_model(body.model)
    vocab = ctx.engine.vocab_size

    def decode(tok) -> str:
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ValueError(f"tokens: token ids must be in [0, {vocab})")
        return tok.decode(body.tokens)

    return {"prompt": await ctx.work.tokenize(decode, len(body.tokens))}
