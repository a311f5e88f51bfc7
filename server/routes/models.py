"""`GET /v1/models` and `GET /v1/models/{model}`: the one model this server serves, in OpenAI's shapes."""
from __future__ import annotations

from fastapi import APIRouter

from server.context import Ctx, ServerContext

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: Ctx):
    return {"object": "list", "data": [_model(ctx)]}


@router.get("/v1/models/{model:path}")  # (a served name may hold slashes: org/name)
async def retrieve_model(model: str, ctx: Ctx):
    ctx.check_model(model)
    return _model(ctx)


def _model(ctx: ServerContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "kvserve",
            "max_model_len": ctx.engine.max_model_len}
