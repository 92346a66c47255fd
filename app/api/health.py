from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..db import repo
from ..db.session import session_scope
from ..errors import error_body
from ..queue import get_celery
from .deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(settings: SettingsDep):
    checks = {"database": await run_in_threadpool(_check_database, settings.resolved_database_url),
              "broker": await run_in_threadpool(_check_broker)}
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    body = error_body("not_ready", "a dependency is unavailable", {"checks": checks})
    return JSONResponse(body, status_code=503)


def _check_database(url: str) -> str:
    try:
        with session_scope(url) as s:
            repo.ping(s)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - report, don't raise
        return f"error: {type(exc).__name__}"


def _check_broker() -> str:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}"
