"""Jobs: validate everything before queueing, commit, then enqueue; idempotency; cancel; views."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from ..config import Settings
from ..contract.architectures import task_of
from ..contract.catalog import CATALOG, MethodInfo, validate_params
from ..contract.jobs import ArtifactOut, JobList, JobOut, JobSpec
from ..db import repo
from ..db.models import Job
from ..db.batched import Batched, per_loop
from ..db.session import read, read_scope, session_scope
from ..errors import ApiError
from ..netguard import NotAllowed, check_url
from ..queue import enqueue_job, get_celery
from ..storage import delete_blob_if_unreferenced
from ..db.views import to_out, to_summary
from .submit_checks import complete_spec
from ..db.fleet import fleet

log = logging.getLogger("adaptd.jobs")


def validate_spec(settings: Settings, tenant_id: str, spec: JobSpec) -> dict:
    """Method, params against the method's schema, the task against method and architecture, upload ids
    and kinds, then the uploads themselves (services/submit_checks.py). Returns the spec to store: params
    with the authors' defaults, model and preprocess completed."""
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
        params = validate_params(info, spec.params, spec.task).model_dump(mode="json")
    except ValidationError as exc:
        errors = [{"loc": ["body", "params", *e["loc"]], "field": ".".join(map(str, ["params", *e["loc"]])),
                   "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise ApiError("invalid_params", f"{errors[0]['field']}: {errors[0]['msg']}",
                       {"errors": errors, "schema": info.params_schema()}) from None
    check_models(spec, info)
    check_task(spec, info)
    check_source_data(spec, info)
    refs = [(field, upload_id, "model") for field, upload_id in spec.model_refs()]
    refs.append(("data", spec.data.upload_id, "dataset"))
    for field in ("eval_data", "labelled_data", "source_data"):
        if getattr(spec, field) is not None:
            refs.append((field, getattr(spec, field).upload_id, "dataset"))
    refs += [(f"params.{name}", params[name], kind) for name, kind in info.upload_params() if params.get(name)]
    uploads = {}
    with session_scope(settings.resolved_database_url) as s:
        for field, upload_id, kind in refs:
            upload = repo.get_upload(s, upload_id, tenant_id)
            where = field if field.startswith("params.") else f"{field}.upload_id"  # a param is the id itself
            if upload is None:
                raise ApiError("unknown_upload", f"{where}: no upload {upload_id!r}", {"field": where})
            if upload.kind != kind:
                raise ApiError("invalid_upload_kind", f"{where}: upload {upload_id} is a {upload.kind!r} upload, "
                               f"expected {kind!r}", {"field": where})
            uploads[field] = upload
        # one-shot methods (idm) take at most `shots` target images
        stored = complete_spec(settings, s, spec, uploads, params.get("shots"))
    if spec.model is not None and spec.model.architecture is None:  # taken from the checkpoint's metadata
        check_task(spec, info, stored["model"]["architecture"])
    if spec.models is not None:  # sources (and student) may have taken theirs from their metadata
        check_task(JobSpec.model_validate(stored), info)
    return {**stored, "params": params}


def check_source_data(spec: JobSpec, info: MethodInfo) -> None:
    """`source_data` (a labelled source pool) goes with the methods that train on one, and only with them."""
    if info.needs_source_data and spec.source_data is None:
        raise ApiError("invalid_spec", f"source_data: {spec.method} trains on a labelled source pool: give "
                       "`source_data` (images with masks)", {"field": "source_data"})
    if spec.source_data is not None and not info.needs_source_data:
        raise ApiError("invalid_spec", f"source_data: {spec.method} does not use a source pool "
                       f"(methods that do: {', '.join(n for n, i in CATALOG.items() if i.needs_source_data)})",
                       {"field": "source_data"})


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


def check_task(spec: JobSpec, info: MethodInfo, resolved: str | None = None) -> None:
    """The job's task must be one the method supports and the one every built-in architecture of the
    spec (model, sources, student) declares (`resolved`: the model's architecture when the spec leaves it
    to the checkpoint's metadata)."""
    if spec.task not in info.tasks:
        raise ApiError("task_mismatch", f"method: {spec.method} supports the tasks {list(info.tasks)}, not "
                       f"{spec.task!r}", {"field": "method", "task": spec.task, "supported": list(info.tasks)})
    for field, ref in spec.architectures():
        architecture = ref.architecture or (resolved if field == "model" else None)
        arch_task = task_of(architecture) if architecture else None
        if arch_task is not None and arch_task != spec.task:
            raise ApiError("task_mismatch", f"{field}.architecture: {architecture} is a {arch_task} "
                           f"architecture, the job's task is {spec.task!r}",
                           {"field": f"{field}.architecture", "task": spec.task, "architecture_task": arch_task})


def create_job(settings: Settings, tenant_id: str, spec: JobSpec, idempotency_key: str | None
               ) -> tuple[JobOut, bool]:
    """Returns (job, created). The job is committed before it is enqueued, so a worker never sees a
    job id that isn't in the database; a lost enqueue is repaired by the reaper."""
    # An empty `Idempotency-Key:` header means none; keys are per tenant.
    idempotency_key = f"{tenant_id}:{idempotency_key}" if idempotency_key else None
    stored = validate_spec(settings, tenant_id, spec)
    body = spec.model_dump(mode="json")
    request_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    url = settings.resolved_database_url
    if idempotency_key:
        existing = _by_key(url, idempotency_key, request_hash)
        if existing is not None:
            return existing, False
    job_id = str(uuid.uuid4())
    try:
        with session_scope(url) as s:
            _check_concurrency(settings, s, tenant_id)
            s.add(Job(id=job_id, tenant_id=tenant_id, name=spec.name, tags=spec.tags, status="queued",
                      method=spec.method, params=stored["params"], spec=stored, idempotency_key=idempotency_key,
                      request_hash=request_hash))
            s.flush()
            repo.add_job_tags(s, job_id, spec.tags)
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


MIN_ID_PREFIX = 6  # the CLI and the dashboard show 8
_ID_PREFIX = re.compile(r"^[0-9a-f-]{1,35}$")


def job_id_for(c, tenant_id: str | None, ref: str) -> str:
    """The id `ref` names: itself, or the one job of the tenant it is a unique prefix of (another
    tenant's job neither matches nor makes a prefix ambiguous). An unknown id comes back as it is."""
    prefix = ref.lower()
    if len(ref) >= 36 or not _ID_PREFIX.match(prefix):
        return ref
    if len(prefix) < MIN_ID_PREFIX:
        raise ApiError("job_id_too_short", f"job id prefix {ref!r} is shorter than {MIN_ID_PREFIX} "
                       "characters", {"prefix": ref, "min_length": MIN_ID_PREFIX})
    ids = repo.job_ids_with_prefix(c, prefix, tenant_id, limit=11)
    if len(ids) > 1:
        raise ApiError("ambiguous_job_id", f"{len(ids) if len(ids) <= 10 else 'more than 10'} jobs start "
                       f"with {ref!r}: give more characters", {"prefix": ref, "matches": ids[:10]})
    return ids[0] if ids else ref


async def full_job_id(settings: Settings, tenant_id: str | None, ref: str) -> str:
    """job_id_for from async code (a full id costs no read)."""
    return ref if len(ref) == 36 else await read(settings.resolved_database_url, job_id_for, tenant_id, ref)


def find_job(s, tenant_id: str | None, ref: str) -> Job:
    """The tenant's job by its id or a unique prefix of it (ORM, in a write session)."""
    job = repo.get_job(s, job_id_for(s, tenant_id, ref), tenant_id)
    if job is None:
        raise ApiError("job_not_found", f"no job {ref!r}")
    return job


def get_job(settings: Settings, tenant_id: str | None, job_id: str) -> JobOut:
    with read_scope(settings.resolved_database_url) as c:
        job_id = job_id_for(c, tenant_id, job_id)
        job = views_out(repo.job_views(c, [job_id], tenant_id)).get(job_id)
    if job is None:
        raise ApiError("job_not_found", f"no job {job_id!r}")
    if job.status == "queued":  # why no worker runs it now, if none can
        job = job.model_copy(update={"waiting_reason": fleet(settings).reason})
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


def _read_views(c, job_ids: list[str]) -> dict[str, View]:
    rows = repo.job_views(c, job_ids)
    tenants = {r.id: r.tenant_id for r in rows}
    return {job_id: View(tenants[job_id], job.model_dump_json().encode())
            for job_id, job in views_out(rows).items()}


def view_reader(settings: Settings) -> Batched[str, View]:
    """`GET /v1/jobs/{id}`: concurrent requests of a process share one statement (app.db.batched)."""
    url = settings.resolved_database_url
    return per_loop(("views", url), lambda: Batched(url, _read_views))


async def job_json(settings: Settings, tenant_id: str | None, job_id: str) -> bytes | None:
    """The body of `GET /v1/jobs/{id}` for a full job id, None when the tenant has no such job (one read
    shared with concurrent requests: view_reader). Both ways in call it: app/api/hotpath and the route."""
    view = await view_reader(settings).get(job_id)
    return view.json if view is not None and view.tenant_id == tenant_id else None


@dataclass(frozen=True)
class PageQuery:
    """What GET /v1/jobs asks for; requests that ask the same share one read (page_reader)."""
    tenant_id: str
    status: str | None
    limit: int
    before: tuple[datetime, str] | None  # the decoded cursor
    full: bool
    name: str | None
    tags: tuple[str, ...]


def page_query(tenant_id: str, status: str | None, limit: int, cursor: str | None, full: bool = False,
               name: str | None = None, tags: list[str] = ()) -> PageQuery:
    """A bad cursor fails its own request here, before any shared read."""
    return PageQuery(tenant_id, status, limit, _decode_cursor(cursor) if cursor else None, full, name, tuple(tags))


def job_page(c, q: PageQuery) -> JobList:
    """GET /v1/jobs on a read connection: one statement (two with `full`: the page's artifacts)."""
    jobs = repo.job_summaries(c, q.status, q.limit + 1, q.before, q.tenant_id, full=q.full, name=q.name,
                              tags=q.tags)
    artifacts = repo.artifacts_of_jobs(c, [j.id for j in jobs[:q.limit]]) if q.full else None
    items = [to_out(j, artifacts[j.id]) if q.full else to_summary(j) for j in jobs[:q.limit]]
    next_cursor = _encode_cursor(jobs[q.limit - 1]) if len(jobs) > q.limit else None
    return JobList(items=items, next_cursor=next_cursor)


def _read_pages(c, queries: list[PageQuery]) -> dict[PageQuery, bytes]:
    return {q: job_page(c, q).model_dump_json().encode() for q in queries}


def page_reader(settings: Settings) -> Batched[PageQuery, bytes]:
    """GET /v1/jobs: concurrent requests of a process that ask for the same page share its read and its
    JSON (app.db.batched; a dashboard's or a CLI's poll asks for the same page again and again)."""
    url = settings.resolved_database_url
    return per_loop(("pages", url), lambda: Batched(url, _read_pages))


def cancel_job(settings: Settings, tenant_id: str, job_id: str) -> JobOut:
    with session_scope(settings.resolved_database_url) as s:
        job_id = find_job(s, tenant_id, job_id).id
        repo.request_cancel(s, job_id)
    return get_job(settings, tenant_id, job_id)


def delete_job(settings: Settings, tenant_id: str, job_id: str) -> None:
    """Delete a finished job with its artifacts' bytes (unless identical content is still referenced)."""
    with session_scope(settings.resolved_database_url) as s:
        repo.lock_tenant(s, tenant_id)  # first: SQLite takes its write lock before reading
        job = find_job(s, tenant_id, job_id)
        job_id = job.id
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
