"""OpenAI's Responses API: `POST /v1/responses` (whole or streamed), and the stored responses:
`GET` and `DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, TypeAdapter

from server.context import Ctx, ServerContext
from server.errors import APIError, renamed
from server.prompting import prepare_chat
from server.protocol_responses import RENAMED, InputItem, MessageItem, ResponsesRequest
from server.render_responses import ResponseRender, new_id
from server.serving import Run
from server.store import Stored

router = APIRouter()
_ITEM = TypeAdapter(InputItem)


@router.post("/v1/responses")
async def create_response(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, ResponsesRequest)
    ctx.check_model(body.model)
    body.check()
    history = _stored(ctx, body.previous_response_id, "previous_response_id").history \
        if body.previous_response_id is not None else []
    request = body.chat_request(history)
    try:
        chat = await prepare_chat(ctx, request)
    except APIError as e:
        raise renamed(e, RENAMED) from None
    render = ResponseRender(ctx, body, chat)
    run = Run(ctx, raw, [chat.prompt], chat.params)

    def keep(response: dict) -> None:
        if body.stores and response["status"] != "failed":
            items = body.input_items()
            outputs = [_ITEM.validate_python(item) for item in response["output"]]
            ctx.responses.put(response["id"], Stored(response, [_listed(i) for i in items],
                                                     history + items + outputs))

    if body.stream:
        return run.stream(lambda deltas: render.stream(deltas, keep))
    out = (await run.whole())[0]
    render.feed(out, out.outputs[0])
    response = render.response()
    keep(response)
    return response


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, raw: Request, ctx: Ctx):
    if raw.query_params.get("stream", "false") != "false":  # (OpenAI's replay of a response's events)
        raise APIError(400, "stream: replaying a stored response as a stream is not supported by this server",
                       param="stream")
    return _stored(ctx, response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, ctx: Ctx):
    _stored(ctx, response_id)
    ctx.responses.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, ctx: Ctx, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           order: Literal["asc", "desc"] = "desc", after: str | None = None):
    items = _stored(ctx, response_id).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in response {response_id!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else "",
            "last_id": page[-1]["id"] if page else "", "has_more": len(items) > limit}


def _stored(ctx: ServerContext, response_id: str, param: str | None = None) -> Stored:
    stored = ctx.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found (never stored, deleted, or evicted: this "
                            "server keeps the latest --responses-store-size responses, in memory).",
                       param=param, code="response_not_found")
    return stored


def _listed(item: BaseModel) -> dict:
    """An input item as `input_items` lists it: with an id, a message's content as parts."""
    data = item.model_dump(exclude_none=True)
    if isinstance(item, MessageItem):
        kind = "output_text" if item.role == "assistant" else "input_text"
        if isinstance(item.content, str):
            part = {"type": kind, "text": item.content}
            data["content"] = [{**part, "annotations": [], "logprobs": []} if kind == "output_text" else part]
        data.setdefault("status", "completed")
    elif item.type != "reasoning":
        data.setdefault("status", "completed")
    prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}[item.type]
    data.setdefault("id", new_id(prefix))
    return data
