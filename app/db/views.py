"""ORM rows (or repo rows with the same names) -> the contract's job JSON: what GET /v1/jobs/{id} answers and
what the worker's webhook POSTs, written once."""
from __future__ import annotations

from ..contract.jobs import ArtifactOut, JobError, JobOut, JobSummary, Progress


def _common(job) -> dict:
    """The fields JobSummary and JobOut share, from an ORM Job or a repo row with the same names."""
    total = job.progress_total or 0
    done = job.progress_done or 0
    # A job's correlation id is its id: the worker logs every line of the job, tracebacks included, under it.
    error = JobError(code=job.error_code, message=job.error_message or "", detail=job.error_detail or {},
                     correlation_id=job.id) if job.error_code else None
    return dict(
        id=job.id, name=job.name, tags=job.tags or [], status=job.status, method=job.method,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at, attempts=job.attempts, cancel_requested=job.cancel_requested,
        progress=Progress(done=done, total=total, fraction=(done / total) if total else
                          (1.0 if job.status == "succeeded" else 0.0), phase=job.phase),
        error=error)


def to_out(job, artifacts) -> JobOut:
    return JobOut(**_common(job), params=job.params, spec=job.spec, metrics=job.metrics,
                  artifacts=[ArtifactOut(name=a.name, size=a.size, sha256=a.sha256) for a in artifacts])


def to_summary(job) -> JobSummary:
    metrics = None if job.metrics is None else \
        {k: v for k, v in job.metrics.items() if not isinstance(v, (dict, list))}
    return JobSummary(**_common(job), metrics=metrics)
