"""Anthropic's Messages API: `POST /v1/messages` (whole or streamed) and
`POST /v1/messages/count_tokens`. Errors on these paths come in Anthropic's shape (server/errors.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import Ctx
from server.errors import APIError, renamed
from server.prompting import chat_prompt_ids, prepare_chat
from server.protocol_messages import RENAMED, CountTokensRequest, MessagesRequest
from server.render_messages import MessageRender
from server.serving import Run

router = APIRouter()


@router.post("/v1/messages")
async def create_message(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, MessagesRequest)
    ctx.check_model(body.model)
    request = body.chat_request()
    try:
        chat = await prepare_chat(ctx, request)
    except APIError as e:
        raise renamed(e, RENAMED) from None
    render = MessageRender(ctx, chat)
    run = Run(ctx, raw, [chat.prompt], chat.params)
    if body.stream:
        return run.stream(render.stream)
    out = (await run.whole())[0]
    render.feed(out, out.outputs[0])
    return render.message()


@router.post("/v1/messages/count_tokens")
async def count_tokens(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, CountTokensRequest)
    ctx.check_model(body.model)
    request = body.chat_request()
    try:
        ids = await chat_prompt_ids(ctx, request)
    except APIError as e:
        raise renamed(e, RENAMED) from None
    return {"input_tokens": len(ids)}
