"""Repositories: every SQL statement of the service. Callers own the session and the commit."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..contract.catalog import CATALOG
from ..contract.jobs import TERMINAL  # noqa: F401  (callers use repo.TERMINAL)
from .models import ApiKey, Artifact, Blob, BlobChunk, Job, JobLog, JobTag, Tenant, Upload, Worker, utcnow


# --- uploads ---------------------------------------------------------------------------------------

def get_upload(s: Session, upload_id: str, tenant_id: str | None = None) -> Upload | None:
    """`tenant_id` scopes the lookup: another tenant's upload is as absent as a missing one."""
    upload = s.get(Upload, upload_id)
    return None if upload is None or (tenant_id is not None and upload.tenant_id != tenant_id) else upload


def add_upload(s: Session, upload: Upload) -> Upload:
    s.add(upload)
    return upload


# --- blobs (app/storage/blobs.py: content-addressed bytes in chunk rows or files) ---------------------

_INSERT_CHUNK = insert(BlobChunk)


def add_blob(s: Session, blob_id: str, in_file: bool) -> None:
    s.add(Blob(id=blob_id, sha256=None, size=0, in_file=in_file))


def blob_in_file(s: Session, blob_id: str) -> bool | None:
    """Whether the blob's bytes are a file (else chunk rows); None when there is no such blob."""
    return s.scalar(select(Blob.in_file).where(Blob.id == blob_id))


def add_blob_chunk(c: Connection, blob_id: str, seq: int, offset: int, data: bytes) -> None:
    c.execute(_INSERT_CHUNK, {"blob_id": blob_id, "seq": seq, "offset": offset, "data": data})


def set_blob_size(s: Session, blob_id: str, size: int) -> bool:
    """Also row-locks the blob (as lock_blob); False when it no longer exists (swept)."""
    return s.execute(update(Blob).where(Blob.id == blob_id).values(size=size)).rowcount == 1


def set_blob_sha256(s: Session, blob_id: str, sha256: str) -> None:
    s.execute(update(Blob).where(Blob.id == blob_id).values(sha256=sha256))


def blob_with_sha256(s: Session, sha256: str) -> str | None:
    return s.scalar(select(Blob.id).where(Blob.sha256 == sha256))


def lock_blob(s: Session, blob_id: str) -> bool:
    """Row-lock a blob until the transaction ends (PostgreSQL; SQLite holds its database write lock);
    False when it no longer exists."""
    return s.execute(update(Blob).where(Blob.id == blob_id).values(size=Blob.size)).rowcount == 1


def blob_is_referenced(s: Session, blob_id: str) -> bool:
    """Some upload or artifact points at the blob."""
    return (s.scalar(select(Upload.id).where(Upload.blob_id == blob_id).limit(1)) is not None
            or s.scalar(select(Artifact.id).where(Artifact.blob_id == blob_id).limit(1)) is not None)


def delete_blob(s: Session, blob_id: str) -> None:
    s.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id))
    s.execute(delete(Blob).where(Blob.id == blob_id))


def unsealed_blobs(s: Session, older_than_s: float, limit: int) -> list[str]:
    """Candidates for the sweep (app/storage/sweep.py): blobs still without a sha256, created more than
    `older_than_s` ago. A snapshot: each is re-checked under its lock (abandoned_blob) before it goes."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(s.scalars(select(Blob.id).where(Blob.sha256.is_(None), Blob.created_at < cutoff).limit(limit)))


def abandoned_blob(s: Session, blob_id: str, older_than_s: float) -> bool:
    """The blob is unsealed, older than `older_than_s` and referenced by nothing. Call it after
    lock_blob in the same transaction: a seal that commits meanwhile made the lock wait, and this
    statement then sees its sha256 (PostgreSQL, read committed: a fresh snapshot per statement;
    SQLite: the write lock is held), so a blob being sealed is never taken for abandoned."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return s.scalar(select(Blob.id).where(
        Blob.id == blob_id, Blob.sha256.is_(None), Blob.created_at < cutoff,
        ~select(Upload.id).where(Upload.blob_id == blob_id).exists(),
        ~select(Artifact.id).where(Artifact.blob_id == blob_id).exists())) is not None


def existing_blob_ids(s: Session, blob_ids: list[str]) -> set[str]:
    """Which of `blob_ids` have a row. A row precedes its final file and ids are never reused, so a file
    whose id is missing here belongs to a deletion that committed (its removal was cut short)."""
    return set(s.scalars(select(Blob.id).where(Blob.id.in_(blob_ids))))


def blob_chunk_at(s: Session, blob_id: str, offset: int) -> int | None:
    """The seq of the chunk holding byte `offset`."""
    return s.scalar(select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id, BlobChunk.offset <= offset)
                    .order_by(BlobChunk.offset.desc()).limit(1))


def blob_chunk(s: Session, blob_id: str, seq: int) -> Row | None:
    """(offset, data) of one chunk."""
    return s.execute(select(BlobChunk.offset, BlobChunk.data)
                     .where(BlobChunk.blob_id == blob_id, BlobChunk.seq == seq)).first()


# --- jobs ------------------------------------------------------------------------------------------

def get_job(s: Session, job_id: str, tenant_id: str | None = None) -> Job | None:
    job = s.get(Job, job_id)
    return None if job is None or (tenant_id is not None and job.tenant_id != tenant_id) else job


def job_ids_with_prefix(c: Connection | Session, prefix: str, tenant_id: str | None, limit: int) -> list[str]:
    """Ids of the tenant's jobs that start with `prefix` (lowercase hex and dashes only, so no LIKE
    wildcard can be in it); another tenant's jobs are never counted."""
    q = select(Job.id).where(Job.id.like(f"{prefix}%"))
    if tenant_id is not None:
        q = q.where(Job.tenant_id == tenant_id)
    return list(c.scalars(q.order_by(Job.id).limit(limit)))


def add_job_tags(s: Session, job_id: str, tags: list[str]) -> None:
    s.add_all(JobTag(job_id=job_id, tag=t) for t in tags)


def get_job_by_idempotency_key(s: Session, key: str) -> Job | None:
    return s.scalar(select(Job).where(Job.idempotency_key == key))


# The read path of the API (GET /v1/jobs, /v1/jobs/{id}, the event streams): Core statements on an
# autocommit connection (app.db.session.read / read_scope), one round trip each. Rows carry the attributes
# app.db.views.to_out reads, under the same names as the ORM's.
_SUMMARY = (Job.id, Job.tenant_id, Job.status, Job.method, Job.created_at, Job.started_at, Job.finished_at,
            Job.heartbeat_at, Job.attempts, Job.cancel_requested, Job.progress_done, Job.progress_total,
            Job.phase, Job.metrics, Job.error_code, Job.error_message, Job.error_detail, Job.name, Job.tags)
_FULL = (*_SUMMARY, Job.params, Job.spec)
_ARTIFACT = (Artifact.name.label("artifact_name"), Artifact.size.label("artifact_size"),
             Artifact.sha256.label("artifact_sha256"))


def job_views(c: Connection | Session, job_ids: list[str], tenant_id: str | None = None) -> list[Row]:
    """Jobs and their artifacts in one statement: one row per artifact (artifact_* None for a job
    without any), ordered by job id and artifact name; absent ids (or another tenant's) have no rows.
    One statement, so a job and its artifacts come from one snapshot."""
    q = (select(*_FULL, *_ARTIFACT).outerjoin(Artifact, Artifact.job_id == Job.id)
         .where(Job.id.in_(job_ids)).order_by(Job.id, Artifact.name))
    if tenant_id is not None:
        q = q.where(Job.tenant_id == tenant_id)
    return list(c.execute(q))


def job_summaries(c: Connection | Session, status: str | None, limit: int, before: tuple[datetime, str] | None,
                  tenant_id: str | None = None, full: bool = False, name: str | None = None,
                  tags: list[str] = ()) -> list[Row]:
    """A page of jobs, newest first, as list rows: no spec or params unless `full` (artifacts are not
    read here; `full` callers read them with artifacts_of_jobs). `name` matches exactly, every one of
    `tags` must be on the job."""
    q = select(*(_FULL if full else _SUMMARY))
    if tenant_id is not None:
        q = q.where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if name is not None:
        q = q.where(Job.name == name)
    for tag in tags:
        q = q.where(Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag)))
    if before:
        created, job_id = before
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    return list(c.execute(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def artifacts_of_jobs(c: Connection | Session, job_ids: list[str]) -> dict[str, list[Row]]:
    """Artifacts (name, size, sha256) of several jobs in one statement, by job id, ordered by name."""
    out: dict[str, list[Row]] = {j: [] for j in job_ids}
    if job_ids:
        q = (select(Artifact.job_id, Artifact.name, Artifact.size, Artifact.sha256)
             .where(Artifact.job_id.in_(job_ids)).order_by(Artifact.job_id, Artifact.name))
        for row in c.execute(q):
            out[row.job_id].append(row)
    return out


def job_beats(c: Connection | Session, job_ids: list[str]) -> dict[str, tuple]:
    """(status, heartbeat_at, progress_done, phase) of several jobs in one statement: what changes when
    a worker writes. Missing jobs are absent."""
    q = select(Job.id, Job.status, Job.heartbeat_at, Job.progress_done, Job.phase).where(Job.id.in_(job_ids))
    return {row.id: tuple(row[1:]) for row in c.execute(q)}


def artifacts_of(s: Session, job_id: str) -> list[Artifact]:
    return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(s: Session, job_id: str, name: str) -> Artifact | None:
    return s.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def request_cancel(s: Session, job_id: str) -> None:
    """Queued jobs are cancelled at once; running ones are flagged for the worker."""
    now = utcnow()
    s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
              .values(status="cancelled", cancel_requested=True, finished_at=now))
    s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))


def claim_job(s: Session, job_id: str, worker: str, stale_after_s: float) -> bool:
    """Atomically move a job to running for this worker: from queued, or from running when its
    heartbeat is stale (the previous worker died). Exactly one claimant wins."""
    now = utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested.is_(False),
               or_(Job.status == "queued", and_(Job.status == "running", Job.heartbeat_at < stale)))
        .values(status="running", attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now),
                heartbeat_at=now, worker=worker, phase="starting")
    )
    return res.rowcount == 1


def heartbeat(s: Session, job_id: str, worker: str, done: int, total: int, phase: str | None
              ) -> tuple[bool, bool]:
    """Record liveness and progress. Returns (still held by this worker, cancellation requested)."""
    res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                    .values(heartbeat_at=utcnow(), progress_done=done, progress_total=total, phase=phase))
    return res.rowcount == 1, bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(s: Session, job_id: str, worker: str, status: str, *, metrics: dict | None = None,
               error: tuple[str, str, dict] | None = None) -> bool:
    """Final transition, only by the worker that holds the job. Drops any earlier artifact rows (a
    redelivered job never stores them twice); the caller adds the new ones (add_artifacts) in the same
    transaction."""
    values = dict(status=status, finished_at=utcnow(), heartbeat_at=utcnow())
    if metrics is not None:
        values.update(metrics=metrics, images_per_second=metrics.get("images_per_second"))
    if error is not None:
        values.update(error_code=error[0], error_message=error[1], error_detail=error[2])
    if status == "succeeded":
        values.update(phase="done")
    res = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                    .values(**values))
    if res.rowcount != 1:
        return False
    s.execute(delete(Artifact).where(Artifact.job_id == job_id))
    return True


def add_artifacts(s: Session, artifacts: list[Artifact]) -> None:
    s.add_all(artifacts)


def fail_job(s: Session, job_id: str, code: str, message: str, detail: dict | None = None) -> bool:
    """Fail a job that no worker holds (e.g. too many attempts)."""
    res = s.execute(update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL))
                    .values(status="failed", finished_at=utcnow(), error_code=code, error_message=message,
                            error_detail=detail or {}))
    return res.rowcount == 1


def stuck_queued_jobs(s: Session, older_than_s: float) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(s.scalars(select(Job.id).where(Job.status == "queued", Job.created_at < cutoff)))


def stale_running_jobs(s: Session, older_than_s: float) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    return list(s.scalars(select(Job.id).where(Job.status == "running", Job.heartbeat_at < cutoff)))


# --- job logs (GET /v1/jobs/{id}/logs) -----------------------------------------------------------

def add_job_logs(s: Session, job_id: str, rows: list[tuple[datetime, str, str]]) -> None:
    """Append (at, level, message) rows. `seq` grows with each insert; a reader's cursor skips nothing
    as long as a job's lines are written one transaction at a time (the worker's JobLog serialises them)."""
    s.add_all(JobLog(job_id=job_id, at=at, level=level, message=message) for at, level, message in rows)


def job_logs(s: Session, job_id: str, after: int, limit: int) -> list[JobLog]:
    return list(s.scalars(select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after)
                          .order_by(JobLog.seq).limit(limit)))


def ping(s: Session) -> None:
    s.execute(select(1))


# --- live progress and service metrics (GET /v1/jobs/{id}/events, GET /metrics) ------------------

def set_live_steps(s: Session, job_id: str, worker: str, rows: list[dict]) -> None:
    """The latest per-step rows of a running job, written by its worker's heartbeat."""
    s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
              .values(live_steps=rows))


def claim_notification(s: Session, job_id: str) -> bool:
    """Atomically mark a finished job's webhook as taken: exactly one caller gets True."""
    res = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(TERMINAL), Job.notified_at.is_(None))
                    .values(notified_at=utcnow()))
    return res.rowcount == 1


def live_steps(s: Connection | Session, job_id: str) -> list[dict]:
    return s.scalar(select(Job.live_steps).where(Job.id == job_id)) or []


def count_jobs_by_status(s: Session) -> dict[str, int]:
    return {status: n for status, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}


def _duration_seconds(s: Session):
    if s.get_bind().dialect.name == "sqlite":
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return func.extract("epoch", Job.finished_at - Job.started_at)


def job_duration_histogram(s: Session, buckets: list[float]) -> dict[str, dict]:
    """Per final status, over jobs that ran (started_at and finished_at set): cumulative bucket counts
    (seconds, `le`), count and sum. Computed in SQL so that it stays cheap with many jobs."""
    d = _duration_seconds(s)
    cols = [func.sum(case((d <= b, 1), else_=0)) for b in buckets]
    q = (select(Job.status, func.count(), func.coalesce(func.sum(d), 0.0), *cols)
         .where(Job.started_at.is_not(None), Job.finished_at.is_not(None), Job.status.in_(TERMINAL))
         .group_by(Job.status))
    out = {}
    for status, count, total, *cum in s.execute(q):
        out[status] = {"count": int(count), "sum": float(total or 0.0), "buckets": [int(c or 0) for c in cum]}
    return out


def upload_totals(s: Session) -> tuple[int, int]:
    """(number of uploads, bytes over all of them, deduplicated ones included)."""
    n, size = s.execute(select(func.count(), func.coalesce(func.sum(Upload.size), 0))).one()
    return int(n), int(size)


# --- tenants, keys, quotas, deletion ---------------------------------------------------------------

def get_api_key_by_hash(s: Session, key_hash: str) -> ApiKey | None:
    return s.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def api_keys_by_hash(c: Connection | Session, key_hashes: list[str]) -> dict[str, Row]:
    """Keys by their sha256, in one statement (id, tenant_id, is_admin, revoked_at); unknown hashes absent."""
    q = select(ApiKey.key_hash, ApiKey.id, ApiKey.tenant_id, ApiKey.is_admin, ApiKey.revoked_at).where(
        ApiKey.key_hash.in_(key_hashes))
    return {r.key_hash: r for r in c.execute(q)}


def ensure_tenant(s: Session, tenant_id: str, **limits) -> Tenant:
    tenant = s.get(Tenant, tenant_id)
    if tenant is None:
        tenant = Tenant(id=tenant_id)
        s.add(tenant)
    for name, value in limits.items():
        if value is not None:
            setattr(tenant, name, value)
    s.flush()
    return tenant


def get_tenant(s: Session, tenant_id: str) -> Tenant | None:
    return s.get(Tenant, tenant_id)


def list_api_keys(s: Session) -> list[ApiKey]:
    return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_api_key(s: Session, key_id: str) -> ApiKey | None:
    key = s.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def lock_tenant(s: Session, tenant_id: str) -> None:
    """Serialise a tenant's limit checks until the transaction ends: call it FIRST in the transaction.
    A no-op UPDATE of the tenant's row: on PostgreSQL a row lock (READ COMMITTED: the count that follows
    sees every insert committed before the lock was granted); on SQLite it takes the database write lock
    before anything is read. The row is created when missing (a concurrent creator's insert makes ours
    fail inside a savepoint; then its row is locked)."""
    if s.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id)).rowcount == 1:
        return
    try:
        with s.begin_nested():
            s.add(Tenant(id=tenant_id))
    except IntegrityError:
        s.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))


def count_active_jobs(s: Session, tenant_id: str) -> int:
    return s.scalar(select(func.count()).select_from(Job)
                    .where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running")))) or 0


def storage_used(s: Session, tenant_id: str) -> int:
    """Bytes charged to a tenant: its uploads plus its jobs' artifacts (logical sizes)."""
    uploads = s.scalar(select(func.coalesce(func.sum(Upload.size), 0)).where(Upload.tenant_id == tenant_id))
    artifacts = s.scalar(select(func.coalesce(func.sum(Artifact.size), 0))
                         .join(Job, Job.id == Artifact.job_id).where(Job.tenant_id == tenant_id))
    return int(uploads or 0) + int(artifacts or 0)


def active_jobs_using_upload(s: Session, upload_id: str, tenant_id: str) -> list[str]:
    """Queued or running jobs of the tenant whose spec names this upload (JSON scanned in Python:
    portable across PostgreSQL and SQLite, and a tenant has few active jobs)."""
    jobs = s.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.status.in_(("queued", "running"))))
    return [j.id for j in jobs if upload_id in _upload_ids(j.spec)]


def _upload_ids(spec: dict) -> set[str]:
    refs = [spec.get(k) or {} for k in ("model", "student", "data", "eval_data", "labelled_data")]
    refs += spec.get("models") or []
    info, params = CATALOG.get(spec.get("method")), spec.get("params") or {}
    files = {params.get(name) for name, _ in info.upload_params()} if info is not None else set()
    return ({r.get("upload_id") for r in refs} | files) - {None}


def delete_job(s: Session, job_id: str) -> list[str]:
    """Delete a job and its artifact rows; returns the blob ids the caller may garbage-collect."""
    blob_ids = [a.blob_id for a in artifacts_of(s, job_id)]
    for table in (Artifact, JobTag, JobLog):
        s.execute(delete(table).where(table.job_id == job_id))
    s.execute(delete(Job).where(Job.id == job_id))
    return blob_ids


def delete_upload(s: Session, upload_id: str) -> str:
    blob_id = s.get(Upload, upload_id).blob_id
    s.execute(delete(Upload).where(Upload.id == upload_id))
    return blob_id


# --- workers (presence and capabilities) ------------------------------------------------------------

def register_worker(s: Session, name: str, queue: str, can_run: bool, reason: str | None,
                    capabilities: dict) -> None:
    """Insert or replace this worker's row. Only the worker itself writes its row (the name holds its
    host and pid), so there is no concurrent writer to race."""
    now = utcnow()
    # Rows of workers that died without removing theirs: gone once a day old.
    s.execute(delete(Worker).where(Worker.heartbeat_at < now - timedelta(days=1)))
    row = s.get(Worker, name)
    if row is None:
        s.add(Worker(name=name, queue=queue, can_run=can_run, reason=reason, capabilities=capabilities,
                     started_at=now, heartbeat_at=now))
    else:
        row.queue, row.can_run, row.reason, row.capabilities, row.heartbeat_at = \
            queue, can_run, reason, capabilities, now


def worker_heartbeat(s: Session, name: str) -> bool:
    """Returns False when the row is gone (the worker then registers again)."""
    return s.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=utcnow())).rowcount == 1


def remove_worker(s: Session, name: str) -> None:
    s.execute(delete(Worker).where(Worker.name == name))


def live_workers(s: Session, queue: str, fresh_s: float) -> list[Worker]:
    """Workers of a queue whose heartbeat is younger than `fresh_s` (older rows are dead workers)."""
    now = utcnow()
    return list(s.scalars(select(Worker).where(Worker.queue == queue,
                                               Worker.heartbeat_at >= now - timedelta(seconds=fresh_s))
                          .order_by(Worker.name)))


def fail_old_queued_jobs(s: Session, older_than_s: float, code: str, message: str, detail: dict) -> list[str]:
    """Fail every job still queued after `older_than_s` (the caller established that no live worker
    can run it). Atomic per job: a job a worker claimed meanwhile is no longer queued and is skipped."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    ids = list(s.scalars(select(Job.id).where(Job.status == "queued", Job.created_at < cutoff)))
    return [job_id for job_id in ids if s.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued")
        .values(status="failed", finished_at=utcnow(), error_code=code, error_message=message,
                error_detail=detail)).rowcount == 1]
