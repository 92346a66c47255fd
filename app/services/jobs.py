"""Jobs: validate everything before queueing, commit, then enqueue; idempotency; cancel; views."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import uuid
from datetime import datetime, timezone

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from ..contract.architectures import task_of
from ..contract.catalog import CATALOG, MethodInfo

from ..config import Settings
from ..db import repo
from ..db.models import Job
from ..db.session import session_scope
from ..errors import ApiError
from ..netguard import NotAllowed, check_url
from ..queue import enqueue_job, get_celery
from ..storage import delete_blob_if_unreferenced
from ..contract.jobs import ArtifactOut, JobError, JobList, JobOut, JobSpec, Progress

log = logging.getLogger("adaptd.jobs")


def validate_spec(settings: Settings, tenant_id: str, spec: JobSpec) -> dict:
    """Method, params against the method's schema, the task against method and architecture, upload ids
    and kinds. Returns the validated params (authors' defaults filled in)."""
    _check_numbers({"params": spec.params, "model": {"arch_kwargs": spec.model.arch_kwargs}})
    size = spec.preprocess.size
    if size is not None and size > settings.max_preprocess_size:
        raise ApiError("validation_error", f"preprocess.size: at most {settings.max_preprocess_size} "
                       "(ADAPTD_MAX_PREPROCESS_SIZE)", {"field": "preprocess.size",
                                                        "limit": settings.max_preprocess_size})
    if spec.notify_url is not None:
        try:
            check_url(str(spec.notify_url), settings.webhook_allowed_hosts)
        except NotAllowed as exc:
            raise ApiError("notify_url_not_allowed", f"notify_url: {exc}", {"field": "notify_url"}) from None
    info = CATALOG.get(spec.method)
    if info is None:
        raise ApiError("unknown_method", f"method: unknown method {spec.method!r}",
                       {"field": "method", "known": sorted(CATALOG)})
    try:
        params = info.params_model.model_validate(spec.params).model_dump(mode="json")
    except ValidationError as exc:
        errors = [{"loc": ["body", "params", *e["loc"]], "field": ".".join(map(str, ["params", *e["loc"]])),
                   "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise ApiError("invalid_params", f"{errors[0]['field']}: {errors[0]['msg']}",
                       {"errors": errors, "schema": info.params_schema()}) from None
    check_task(spec, info)
    refs = [("model", spec.model.upload_id, "model"), ("data", spec.data.upload_id, "dataset")]
    if spec.eval_data is not None:
        refs.append(("eval_data", spec.eval_data.upload_id, "dataset"))
    with session_scope(settings.resolved_database_url) as s:
        for field, upload_id, kind in refs:
            upload = repo.get_upload(s, upload_id, tenant_id)
            if upload is None:
                raise ApiError("unknown_upload", f"{field}.upload_id: no upload {upload_id!r}",
                               {"field": f"{field}.upload_id"})
            if upload.kind != kind:
                raise ApiError("invalid_upload_kind", f"{field}.upload_id: upload {upload_id} is a "
                               f"{upload.kind!r} upload, expected {kind!r}", {"field": f"{field}.upload_id"})
    return params


MAX_ABS_NUMBER = 1e12  # no parameter of any method is sanely larger; keeps overflow out of the engine


def _check_numbers(value, path: str = "") -> None:
    """Every number in free-form parts of a spec (method params, arch_kwargs) is finite and bounded;
    the typed parts are checked by their schema."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, f"{path}.{i}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_ABS_NUMBER):
        raise ApiError("invalid_params", f"{path}: numbers must be finite and at most {MAX_ABS_NUMBER:g} "
                       "in magnitude", {"field": path})


def check_task(spec: JobSpec, info: MethodInfo) -> None:
    """The job's task must be one the method supports and the one a built-in architecture declares."""
    if spec.task not in info.tasks:
        raise ApiError("task_mismatch", f"method: {spec.method} supports the tasks {list(info.tasks)}, not "
                       f"{spec.task!r}", {"field": "method", "task": spec.task, "supported": list(info.tasks)})
    arch_task = task_of(spec.model.architecture)
    if arch_task is not None and arch_task != spec.task:
        raise ApiError("task_mismatch", f"model.architecture: {spec.model.architecture} is a {arch_task} "
                       f"architecture, the job's task is {spec.task!r}",
                       {"field": "model.architecture", "task": spec.task, "architecture_task": arch_task})


def create_job(settings: Settings, tenant_id: str, spec: JobSpec, idempotency_key: str | None
               ) -> tuple[JobOut, bool]:
    """Returns (job, created). The job is committed before it is enqueued, so a worker never sees a
    job id that isn't in the database; a lost enqueue is repaired by the reaper."""
    # An empty `Idempotency-Key:` header means none; keys are per tenant.
    idempotency_key = f"{tenant_id}:{idempotency_key}" if idempotency_key else None
    params = validate_spec(settings, tenant_id, spec)
    body = spec.model_dump(mode="json")
    request_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    url = settings.resolved_database_url
    if idempotency_key:
        existing = _by_key(url, idempotency_key, request_hash)
        if existing is not None:
            return existing, False
    job_id = str(uuid.uuid4())
    stored = {**body, "params": params}
    try:
        with session_scope(url) as s:
            _check_concurrency(settings, s, tenant_id)
            s.add(Job(id=job_id, tenant_id=tenant_id, status="queued", method=spec.method, params=params,
                      spec=stored, idempotency_key=idempotency_key, request_hash=request_hash))
    except IntegrityError:  # the same key, concurrently
        existing = _by_key(url, idempotency_key, request_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    try:
        enqueue_job(get_celery(), job_id, settings.queue)
    except Exception:  # noqa: BLE001 - broker down: the job stays queued and the reaper re-enqueues it
        log.exception("enqueue of job %s failed; left queued for the reaper", job_id)
    return get_job(settings, tenant_id, job_id), True


def _check_concurrency(settings: Settings, s, tenant_id: str) -> None:
    """Count and insert under the tenant's lock, so simultaneous submits cannot all pass the check."""
    repo.lock_tenant(s, tenant_id)
    tenant = repo.get_tenant(s, tenant_id)
    limit = (tenant and tenant.max_concurrent_jobs) or settings.tenant_max_concurrent_jobs
    active = repo.count_active_jobs(s, tenant_id)
    if active >= limit:
        raise ApiError("concurrent_job_limit", f"the tenant already has {active} queued or running jobs "
                       f"(limit {limit}); wait for one to finish", {"limit": limit, "active": active},
                       headers={"Retry-After": "30"})


def _by_key(url: str, key: str, request_hash: str) -> JobOut | None:
    with session_scope(url) as s:
        job = repo.get_job_by_idempotency_key(s, key)
        if job is None:
            return None
        if job.request_hash != request_hash:
            raise ApiError("idempotency_conflict", "this Idempotency-Key was used with a different body",
                           {"job_id": job.id})
        return to_out(job, repo.artifacts_of(s, job.id))


def get_job(settings: Settings, tenant_id: str | None, job_id: str) -> JobOut:
    with session_scope(settings.resolved_database_url) as s:
        job = repo.get_job(s, job_id, tenant_id)
        if job is None:
            raise ApiError("job_not_found", f"no job {job_id!r}")
        return to_out(job, repo.artifacts_of(s, job_id))


def list_jobs(settings: Settings, tenant_id: str, status: str | None, limit: int, cursor: str | None
              ) -> JobList:
    before = _decode_cursor(cursor) if cursor else None
    with session_scope(settings.resolved_database_url) as s:
        jobs = repo.list_jobs(s, status, limit + 1, before, tenant_id)
        items = [to_out(j, repo.artifacts_of(s, j.id)) for j in jobs[:limit]]
    next_cursor = _encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return JobList(items=items, next_cursor=next_cursor)


def cancel_job(settings: Settings, tenant_id: str, job_id: str) -> JobOut:
    with session_scope(settings.resolved_database_url) as s:
        if repo.get_job(s, job_id, tenant_id) is None:
            raise ApiError("job_not_found", f"no job {job_id!r}")
        repo.request_cancel(s, job_id)
    return get_job(settings, tenant_id, job_id)


def delete_job(settings: Settings, tenant_id: str, job_id: str) -> None:
    """Delete a finished job with its artifacts' bytes (unless identical content is still referenced)."""
    with session_scope(settings.resolved_database_url) as s:
        repo.lock_tenant(s, tenant_id)  # first: SQLite takes its write lock before reading
        job = repo.get_job(s, job_id, tenant_id)
        if job is None:
            raise ApiError("job_not_found", f"no job {job_id!r}")
        if job.status not in repo.TERMINAL:
            raise ApiError("job_active", f"job {job_id} is {job.status}: cancel it before deleting it",
                           {"status": job.status})
        for blob_id in repo.delete_job(s, job_id):
            delete_blob_if_unreferenced(s, blob_id)


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at.isoformat()}|{job.id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        at = datetime.fromisoformat(created)
        # In UTC here, as the database compares it: an offset that leaves year 1..9999 is invalid.
        return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).astimezone(timezone.utc), job_id
    except Exception:  # noqa: BLE001
        raise ApiError("validation_error", "cursor: invalid cursor", {"field": "cursor"}) from None


def to_out(job: Job, artifacts) -> JobOut:
    total = job.progress_total or 0
    done = job.progress_done or 0
    # A job's correlation id is its id: the worker logs every line of the job, tracebacks included, under it.
    error = JobError(code=job.error_code, message=job.error_message or "", detail=job.error_detail or {},
                     correlation_id=job.id) if job.error_code else None
    return JobOut(
        id=job.id, status=job.status, method=job.method, params=job.params, spec=job.spec,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at, attempts=job.attempts, cancel_requested=job.cancel_requested,
        progress=Progress(done=done, total=total, fraction=(done / total) if total else
                          (1.0 if job.status == "succeeded" else 0.0), phase=job.phase),
        metrics=job.metrics, error=error,
        artifacts=[ArtifactOut(name=a.name, size=a.size, sha256=a.sha256) for a in artifacts],
    )
