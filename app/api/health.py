from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..db import repo
from ..db.session import session_scope
from ..errors import error_body
from ..queue import get_celery
from ..storage.files import check_writable
from ..db.fleet import fleet
from .deps import SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(settings: SettingsDep):
    """Ready when the database and the broker answer, the blob folder (if any) takes a file, and some
    live worker can run jobs; otherwise 503 with each check's reason (a job submitted meanwhile waits,
    queued, with the same reason)."""
    database = await run_in_threadpool(_check_database, settings.resolved_database_url)
    checks = {"database": database, "broker": await run_in_threadpool(_check_broker)}
    if settings.resolved_blob_dir is not None:
        checks["blob_folder"] = await run_in_threadpool(check_writable, settings.resolved_blob_dir)
    workers: list[dict] = []
    if database == "ok":
        current = await run_in_threadpool(fleet, settings)
        checks["workers"] = "ok" if current.reason is None else f"error: {current.reason}"
        workers = [{k: w[k] for k in ("name", "can_run", "reason", "heartbeat_at")} | {
            "device": w["capabilities"].get("device")} for w in current.workers]
    else:
        checks["workers"] = "error: unknown (the database is unavailable)"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks, "workers": workers}
    failing = [f"{name}: {v.removeprefix('error: ')}" for name, v in checks.items() if v != "ok"]
    body = error_body("not_ready", "not ready: " + "; ".join(failing), {"checks": checks, "workers": workers})
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
