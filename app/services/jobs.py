"""Jobs: validate everything before queueing, commit, then enqueue; idempotency; cancel; views."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import uuid
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from ..contract.architectures import task_of
from ..contract.catalog import CATALOG, MethodInfo

from ..config import Settings
from ..db import repo
from ..db.models import Job
from ..db.session import read, read_scope, session_scope
from ..errors import ApiError
from ..netguard import NotAllowed, check_url
from ..queue import enqueue_job, get_celery
from ..storage import delete_blob_if_unreferenced
from ..contract.jobs import ArtifactOut, JobError, JobList, JobOut, JobSpec, JobSummary, Progress

log = logging.getLogger("adaptd.jobs")
T = TypeVar("T")


def validate_spec(settings: Settings, tenant_id: str, spec: JobSpec) -> dict:
    """Method, params against the method's schema, the task against method and architecture, upload ids
    and kinds. Returns the validated params (authors' defaults filled in)."""
    _check_numbers({"params": spec.params, **{field: {"arch_kwargs": ref.arch_kwargs}
                                              for field, ref in spec.architectures()}})
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
    check_models(spec, info)
    check_task(spec, info)
    refs = [(field, upload_id, "model") for field, upload_id in spec.model_refs()]
    refs.append(("data", spec.data.upload_id, "dataset"))
    for field in ("eval_data", "labelled_data"):
        if getattr(spec, field) is not None:
            refs.append((field, getattr(spec, field).upload_id, "dataset"))
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


def check_models(spec: JobSpec, info: MethodInfo) -> None:
    """Multi-source methods take `models` (and a `student`), every other method one `model`."""
    multisource = info.kind == "multisource"
    if multisource != (spec.models is not None):
        field = "model" if multisource else "models"  # the one given that the method does not take
        raise ApiError("invalid_spec", f"{field}: {spec.method} takes "
                       + ("`models` (source models) and a `student`, not `model`" if multisource
                          else "one `model`, not `models`"), {"field": field})


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
    """The job's task must be one the method supports and the one every built-in architecture of the
    spec (model, sources, student) declares."""
    if spec.task not in info.tasks:
        raise ApiError("task_mismatch", f"method: {spec.method} supports the tasks {list(info.tasks)}, not "
                       f"{spec.task!r}", {"field": "method", "task": spec.task, "supported": list(info.tasks)})
    for field, ref in spec.architectures():
        arch_task = task_of(ref.architecture)
        if arch_task is not None and arch_task != spec.task:
            raise ApiError("task_mismatch", f"{field}.architecture: {ref.architecture} is a {arch_task} "
                           f"architecture, the job's task is {spec.task!r}",
                           {"field": f"{field}.architecture", "task": spec.task, "architecture_task": arch_task})


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
    with read_scope(settings.resolved_database_url) as c:
        job = views_out(repo.job_views(c, [job_id], tenant_id)).get(job_id)
    if job is None:
        raise ApiError("job_not_found", f"no job {job_id!r}")
    return job


def views_out(rows) -> dict[str, JobOut]:
    """JobOut by id from repo.job_views's rows (a job's columns, one row per artifact)."""
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r.id, []).append(r)
    return {job_id: to_out(rs[0], [ArtifactOut(name=r.artifact_name, size=r.artifact_size, sha256=r.artifact_sha256)
                                   for r in rs if r.artifact_name is not None])
            for job_id, rs in by_id.items()}


@dataclass(frozen=True)
class View:
    tenant_id: str
    json: bytes  # the body of GET /v1/jobs/{id}


class ViewReader:
    """`GET /v1/jobs/{id}` in one API process (and event loop). A request that finds no read in flight
    starts one; requests arriving meanwhile wait for the next, which reads all their jobs in one
    statement, and requests for the same job share its JSON. So every answer comes from a read that
    started after its request arrived (a client reads its own writes), a process has at most one
    such read in flight, and N pollers cost a few statements per round trip instead of N."""

    MAX_IDS = 500  # per statement

    def __init__(self, url: str):
        self.url = url
        self.pending: dict[str, list[asyncio.Future]] = {}
        self.busy = False

    async def get(self, job_id: str) -> View | None:
        future = asyncio.get_running_loop().create_future()
        self.pending.setdefault(job_id, []).append(future)
        if not self.busy:
            self.busy = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                ids = list(self.pending)[:self.MAX_IDS]
                batch = {job_id: self.pending.pop(job_id) for job_id in ids}
                try:
                    views = await read(self.url, _read_views, ids)
                except Exception as exc:  # noqa: BLE001 - every waiting request gets it (503 etc.)
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(exc)
                    continue
                for job_id, futures in batch.items():
                    for f in futures:
                        if not f.done():
                            f.set_result(views.get(job_id))
        finally:
            self.busy = False


def _read_views(c, job_ids: list[str]) -> dict[str, View]:
    rows = repo.job_views(c, job_ids)
    tenants = {r.id: r.tenant_id for r in rows}
    return {job_id: View(tenants[job_id], job.model_dump_json().encode())
            for job_id, job in views_out(rows).items()}


_per_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()


def per_loop(key: tuple, make: Callable[[], T]) -> T:
    """One object per event loop and key (its futures and tasks belong to that loop)."""
    objects = _per_loop.setdefault(asyncio.get_running_loop(), {})
    if key not in objects:
        objects[key] = make()
    return objects[key]


def view_reader(settings: Settings) -> ViewReader:
    url = settings.resolved_database_url
    return per_loop(("views", url), lambda: ViewReader(url))


def job_page(c, tenant_id: str, status: str | None, limit: int, cursor: str | None, full: bool = False
             ) -> JobList:
    """GET /v1/jobs on a read connection: one statement (two with `full`: the page's artifacts)."""
    before = _decode_cursor(cursor) if cursor else None
    jobs = repo.job_summaries(c, status, limit + 1, before, tenant_id, full=full)
    artifacts = repo.artifacts_of_jobs(c, [j.id for j in jobs[:limit]]) if full else None
    items = [to_out(j, artifacts[j.id]) if full else to_summary(j) for j in jobs[:limit]]
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


def _common(job) -> dict:
    """The fields JobSummary and JobOut share, from an ORM Job or a repo row with the same names."""
    total = job.progress_total or 0
    done = job.progress_done or 0
    # A job's correlation id is its id: the worker logs every line of the job, tracebacks included, under it.
    error = JobError(code=job.error_code, message=job.error_message or "", detail=job.error_detail or {},
                     correlation_id=job.id) if job.error_code else None
    return dict(
        id=job.id, status=job.status, method=job.method,
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
