"""`GET /v1/models`: the one model this server serves, as OpenAI's model list."""
from __future__ import annotations

from fastapi import APIRouter

from server.context import Ctx

router = APIRouter()


@router.get("/v1/models")
async def list_models(ctx: Ctx):
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "kvserve",
                                        "max_model_len": ctx.engine.max_model_len}]}
