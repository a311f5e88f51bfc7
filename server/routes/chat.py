"""`POST /v1/chat/completions`: OpenAI chat completions through the model's chat template, with
tools, structured outputs and a reasoning model's thinking."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import Ctx
from server.errors import call
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
    texts = ctx.token_names(body.return_tokens_as_token_ids)
    echo = call(body.echoed)
    render = ChoiceRender(True, texts if body.logprobs else None, [chat.prompt], None if echo is None else [echo],
                          tools=chat.calls, reasoning=ctx.reasoning, thinking=chat.thinking, prompt_texts=texts)
    return await respond(Run(ctx, raw, [chat.prompt], chat.params, body.request_id, body.who,
                             body.priority), "chatcmpl", render, body)
