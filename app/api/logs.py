"""`GET /v1/jobs/{id}/logs`: the job's own log lines after a cursor (`adaptd logs JOB --follow` polls it)."""
from __future__ import annotations

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from ..contract.jobs import JobLogPage
from ..services import job_logs as service
from .deps import PrincipalDep, SettingsDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}/logs", response_model=JobLogPage)
async def job_logs(job_id: str, settings: SettingsDep, who: PrincipalDep,
                   after: int = Query(0, ge=0, le=2**62, description="the last `seq` seen (0: from the start)"),
                   limit: int = Query(500, ge=1, le=5000)) -> JobLogPage:
    return await run_in_threadpool(service.log_page, settings, who.tenant_id, job_id, after, limit)
