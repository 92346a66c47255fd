from __future__ import annotations

import re
from typing import Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..db import repo
from ..db.session import session_scope
from ..errors import ApiError
from ..contract.jobs import JobList, JobOut, JobSpec, JobStatus
from ..services import jobs as service
from ..storage import iter_blob
from .deps import PrincipalDep, SettingsDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ARTIFACT_TYPES = {"model.safetensors": "application/octet-stream", "metrics.json": "application/json",
                  "history.json": "application/json", "examples.json": "application/json"}


@router.post("", status_code=202, response_model=JobOut)
async def create_job(spec: JobSpec, settings: SettingsDep, who: PrincipalDep, response: Response,
                     idempotency_key: str | None = Header(None, max_length=255)) -> JobOut:
    job, created = await run_in_threadpool(service.create_job, settings, who.tenant_id, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", response_model=JobList)
async def list_jobs(settings: SettingsDep, who: PrincipalDep,
                    status: JobStatus | None = None,
                    limit: int = Query(50, ge=1, le=500), cursor: str | None = Query(None, max_length=500),
                    view: Literal["summary", "full"] = Query("summary", description="summary rows (no spec, "
                                                             "params, artifacts; scalar metrics only) or "
                                                             "full jobs as GET /v1/jobs/{id}"),
                    name: str | None = Query(None, max_length=200, description="exactly this name"),
                    tag: list[str] = Query([], max_length=32, description="repeatable: jobs with all these tags")
                    ) -> Response:
    query = service.page_query(who.tenant_id, status, limit, cursor, view == "full", name, tag)
    return Response(await service.page_reader(settings).get(query), media_type="application/json")


# A full id that its tenant may read is answered in front of the framework (app/api/hotpath.py), with the
# same service.job_json; what comes here is an id prefix or an error.
@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, settings: SettingsDep, who: PrincipalDep) -> Response:
    job_id = await service.full_job_id(settings, who.tenant_id, job_id)
    body = await service.job_json(settings, who.tenant_id, job_id)
    if body is None:
        raise ApiError("job_not_found", f"no job {job_id!r}")
    return Response(body, media_type="application/json")


@router.delete("/{job_id}", status_code=204)
async def delete_job(job_id: str, settings: SettingsDep, who: PrincipalDep) -> Response:
    await run_in_threadpool(service.delete_job, settings, who.tenant_id, job_id)
    return Response(status_code=204)


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: str, settings: SettingsDep, who: PrincipalDep) -> JobOut:
    return await run_in_threadpool(service.cancel_job, settings, who.tenant_id, job_id)


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@router.get("/{job_id}/artifacts/{name}", responses={206: {"description": "partial content"}})
async def download_artifact(job_id: str, name: str, request: Request, settings: SettingsDep, who: PrincipalDep):
    url = settings.resolved_database_url

    def lookup():
        with session_scope(url) as s:
            job = service.find_job(s, who.tenant_id, job_id)
            artifact = repo.get_artifact(s, job.id, name)
            if artifact is None:
                names = [a.name for a in repo.artifacts_of(s, job.id)]
                raise ApiError("artifact_not_found", f"job {job.id} has no artifact {name!r}",
                               {"available": names})
            return artifact

    artifact = await run_in_threadpool(lookup)
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{name}"'}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    start, end = 0, artifact.size
    status = 200
    range_header = request.headers.get("range")
    if range_header and request.headers.get("if-range", etag) == etag:
        start, end = _parse_range(range_header, artifact.size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(iter_blob(url, artifact.blob_id, start, end), status_code=status, headers=headers,
                             media_type=ARTIFACT_TYPES.get(name, "application/octet-stream"))


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range -> [start, end)."""
    m = _RANGE.match(header.strip())
    unsatisfiable = ApiError("range_not_satisfiable", f"cannot serve range {header!r} of {size} bytes",
                             {"size": size}, headers={"Content-Range": f"bytes */{size}"})
    if not m or (not m.group(1) and not m.group(2)):
        raise unsatisfiable
    if not m.group(1):  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0:
            raise unsatisfiable
        return max(size - n, 0), size
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or end <= start:
        raise unsatisfiable
    return start, end
