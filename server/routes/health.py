"""Liveness and metrics: answered without the API key and while draining (server/guard.py)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.context import Ctx

router = APIRouter()


@router.get("/health")
async def health(ctx: Ctx):
    if not ctx.engine.is_alive:
        return JSONResponse({"status": "dead"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(ctx: Ctx):
    return Response(generate_latest(ctx.engine.metrics_registry), media_type=CONTENT_TYPE_LATEST)
