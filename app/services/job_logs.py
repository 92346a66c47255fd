"""A job's own log lines (written by its worker, worker/joblog.py), a page at a time after a cursor."""
from __future__ import annotations

from ..config import Settings
from ..db import repo
from ..db.session import session_scope
from ..contract.jobs import JobLogPage, LogLineOut
from .jobs import find_job


def log_page(settings: Settings, tenant_id: str | None, job_ref: str, after: int, limit: int) -> JobLogPage:
    """The status is read before the lines: the worker stores a job's last lines in the transaction
    that makes it final, so a reader that sees a final status also sees every line."""
    with session_scope(settings.resolved_database_url) as s:
        job = find_job(s, tenant_id, job_ref)
        status = job.status
        rows = repo.job_logs(s, job.id, after, limit + 1)
    items = [LogLineOut(seq=r.seq, at=r.at, level=r.level, message=r.message) for r in rows[:limit]]
    return JobLogPage(job_id=job.id, status=status, items=items, next_after=items[-1].seq if items else after,
                      more=len(rows) > limit)
