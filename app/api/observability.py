"""`GET /metrics`: Prometheus text format (app.services.prometheus)."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..auth import principal_of, presented_key, require_admin
from ..config import Settings
from ..services import prometheus
from .deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request, settings: SettingsDep) -> PlainTextResponse:
    await _check_scraper(request, settings)
    text = await run_in_threadpool(prometheus.render, settings)
    return PlainTextResponse(text, media_type=prometheus.CONTENT_TYPE)


async def _check_scraper(request: Request, settings: Settings) -> None:
    """Service-wide numbers (every tenant's jobs and bytes): in keys mode only for the metrics token
    (ADAPTD_METRICS_TOKEN) or an admin key; open mode serves loopback only and stays open."""
    if settings.auth == "open":
        return
    key = presented_key(request)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if key is not None and token is not None and hmac.compare_digest(key.encode(), token.encode()):
        return
    require_admin(await principal_of(request, settings))
