"""`GET /v1/jobs/{id}/events`: live progress as Server-Sent Events (see app.services.events)."""
from __future__ import annotations

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from ..db.session import read
from ..services import events as service
from .deps import PrincipalDep, SettingsDep

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events: status, progress, step, end"}})
async def job_events(job_id: str, request: Request, settings: SettingsDep, who: PrincipalDep,
                     last_event_id: str | None = Header(None, max_length=32)):
    # 404 (before the stream starts) for missing jobs and for other tenants'
    first = await read(settings.resolved_database_url, service.snapshot, job_id, who.tenant_id)
    return StreamingResponse(service.job_events(settings, first, last_event_id, request.is_disconnected),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
