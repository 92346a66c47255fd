"""`GET /v1/jobs/{id}`, the route clients poll, answered in front of the framework's routing and
exception layers, which cost more CPU than the job read itself (BENCHMARKS.md, API third pass). Only
the success case is served here: any other request, and a full job id that does not answer 200 at once
(missing, another tenant's, a refused key, a database error), goes on through FastAPI to the same
route (`jobs.get_job`), which answers it as every route does. A GET reads nothing from its body, so
passing it on after a failed attempt is safe."""
from __future__ import annotations

from starlette.requests import Request

from ..auth import principal_of
from ..config import get_settings
from ..services import jobs as service

PREFIX = "/v1/jobs/"
JOB_ID_LENGTH = 36
HEADERS = [(b"content-type", b"application/json")]


class JobPoll:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] == "http" and scope["method"] == "GET" and len(path) == len(PREFIX) + JOB_ID_LENGTH
                and path.startswith(PREFIX)):
            body = await _job_json(Request(scope), path[len(PREFIX):])
            if body is not None:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def _job_json(request: Request, job_id: str) -> bytes | None:
    """The job's JSON when the request may read it; None for everything else (FastAPI answers it)."""
    settings = get_settings()
    try:
        who = await principal_of(request, settings)
        return await service.job_json(settings, who.tenant_id, job_id)
    except Exception:  # noqa: BLE001 - the route raises it again and answers it
        return None
