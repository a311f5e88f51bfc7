"""`POST /v1/chat/completions`: OpenAI chat completions through the model's chat template, with
tools, structured outputs and a reasoning model's thinking."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import Ctx
from server.prompting import prepare_chat
from server.protocol import ChatCompletionRequest
from server.render import ChoiceRender, respond
from server.serving import Run

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, ChatCompletionRequest)
    ctx.check_model(body.model)
    chat = await prepare_chat(ctx, body)
    render = ChoiceRender(True, ctx.token_text if body.logprobs else None, [chat.prompt], tools=chat.calls,
                          reasoning=ctx.reasoning, thinking=chat.thinking)
    return await respond(Run(ctx, raw, [chat.prompt], chat.params), "chatcmpl", render, body.stream,
                         body.include_usage)
