"""`GET /metrics`: Prometheus text format (app.services.prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..services import prometheus
from .deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(settings: SettingsDep) -> PlainTextResponse:
    text = await run_in_threadpool(prometheus.render, settings)
    return PlainTextResponse(text, media_type=prometheus.CONTENT_TYPE)
