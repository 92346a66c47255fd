"""job_id -> load spec -> claim -> fetch inputs -> run the engine -> store artifacts and metrics.

Idempotent: a job is claimed atomically (queued, or running with a stale heartbeat), artifacts are
content-addressed and replace earlier ones in the final transaction, and a redelivered message for a
finished job does nothing."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import logging
import tempfile
import threading
import time
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from app.config import get_settings
from app.db import repo
from app.db.models import Artifact
from app.db.session import session_scope
from app.queue import RUN_JOB_TASK
from app.storage import BlobWriter, copy_blob_to_file

from .notify import notify_if_finished

from . import joblog
from .celery_app import celery_app
from .presence import worker_name

log = logging.getLogger("adaptd.worker")
LIVE_STEPS_KEPT = 500  # per-step rows kept in jobs.live_steps while a job runs


class Heartbeat(threading.Thread):
    """Writes liveness and the latest progress to the database every interval, and picks up cancel
    requests; the engine reads the flag between batches (no database call on the hot path)."""

    def __init__(self, db_url: str, job_id: str, worker: str, interval: float, log: joblog.JobLog):
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.db_url, self.job_id, self.worker, self.interval = db_url, job_id, worker, interval
        self.log = log  # the job's own log lines go out with each beat
        self.done = self.total = 0
        self.phase = "starting"
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # another worker took the job over (ours looked dead)
        self._halt = threading.Event()  # not `_stop`: threading.Thread has a method of that name
        self.recent_steps: collections.deque = collections.deque(maxlen=LIVE_STEPS_KEPT)
        self._steps_lock = threading.Lock()
        self._steps_dirty = False

    def progress(self, done: int, total: int, phase: str) -> None:
        changed = phase != self.phase
        self.done, self.total, self.phase = done, total, phase
        if changed:
            self.log.note(logging.INFO, "%s%s", phase, f" ({done}/{total} batches)" if total else "")
            self.beat()  # phase changes are rare and worth showing at once

    def steps(self, rows: list[dict]) -> None:
        """Engine hook: the new per-step rows (loss, entropy, ...); written on the next beat."""
        rows = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()}
                for r in rows]  # NaN/inf are not JSON (PostgreSQL refuses them)
        with self._steps_lock:
            self.recent_steps.extend(rows)
            self._steps_dirty = True

    def should_cancel(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def beat(self) -> None:
        try:
            with self.log.transaction(self.db_url) as s:
                held, cancel = repo.heartbeat(s, self.job_id, self.worker, self.done, self.total, self.phase)
                with self._steps_lock:  # live curves for GET /v1/jobs/{id}/events
                    rows, self._steps_dirty = (list(self.recent_steps) if self._steps_dirty else None), False
                if rows is not None:
                    repo.set_live_steps(s, self.job_id, self.worker, rows)
            if cancel:
                self.cancelled.set()
            if not held:
                self.lost.set()
        except Exception:  # noqa: BLE001 - a missed beat is not fatal; the next one retries
            self._steps_dirty = True
            log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._halt.set()


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    settings = get_settings()
    url = settings.resolved_database_url
    me = worker_name()
    started = time.monotonic()  # Celery's soft time limit counts from about here
    try:
        return _claim_and_run(self, job_id, settings, url, me, started)
    except OperationalError as exc:
        # Database down before the job started: try again shortly (the message is not lost).
        log.warning("database unavailable for job %s: %s", job_id, str(exc).splitlines()[0][:200])
        raise self.retry(countdown=5, max_retries=None) from None
    finally:
        notify_if_finished(settings, job_id)  # notify_url webhook: only for terminal jobs, at most once


def _claim_and_run(self, job_id: str, settings, url: str, me: str, started: float) -> str:
    stale_after = settings.resolved_stale_after_s
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return "missing"
        if job.status in repo.TERMINAL:
            return job.status  # a redelivered message for a finished job
        if job.status == "running" and not _is_stale(job.heartbeat_at, stale_after):
            held_elsewhere = True  # a live worker holds it, or a dead one whose heartbeat is not stale yet
        elif job.attempts >= settings.max_attempts:
            repo.fail_job(s, job_id, "worker_lost", f"the job was started {job.attempts} times and its worker "
                          "was lost each time (killed, out of host memory, or crashed)", {"attempts": job.attempts})
            return "failed"
        else:
            held_elsewhere = False
            claimed = repo.claim_job(s, job_id, me, stale_after)
            spec = job.spec
    if held_elsewhere:
        raise self.retry(countdown=stale_after, max_retries=None)  # look again once it could be stale
    if not claimed:
        return "not_claimed"  # cancelled meanwhile, or another worker won the claim
    with joblog.capture(job_id) as job_log:
        job_log.note(logging.INFO, "claimed by %s", me)
        heartbeat = Heartbeat(url, job_id, me, settings.heartbeat_interval_s, job_log)
        heartbeat.start()
        try:
            return _execute(url, settings, job_id, spec, me, heartbeat, started)
        finally:
            heartbeat.stop()


def _execute(url: str, settings, job_id: str, spec: dict, me: str, heartbeat: Heartbeat, started: float) -> str:
    from worker.adaptation.errors import JobCancelled  # torch-free

    with tempfile.TemporaryDirectory(prefix=f"adaptd-{job_id[:8]}-", dir=settings.artifact_dir) as tmp:
        tmpdir = Path(tmp)
        try:
            # torch is imported in the child that runs jobs (worker/celery_app.py does it when the child
            # starts), never in the prefork parent; inside the try, so a time limit here is classified.
            from worker.adaptation.multisource_run import execute

            from .spec import build_run_request

            request = build_run_request(spec, tmpdir, lambda upload_id, dest: _fetch(url, upload_id, dest))
            request = dataclasses.replace(request, data_options={"max_pixels": settings.max_image_pixels})
            result = execute(request, heartbeat)
            heartbeat.log.note(logging.INFO, "succeeded%s", _outcome(result.metrics))
            ok = _store_and_finish(url, settings, job_id, me, tmpdir, result, heartbeat.log)
            return "succeeded" if ok else "lost_claim"
        except JobCancelled:
            if heartbeat.lost.is_set():
                log.warning("job %s was taken over by another worker; stopping this copy", job_id)
                return "lost_claim"
            outcome, error = "cancelled", ("cancelled", "cancelled at the user's request", {})
        except Exception as exc:  # noqa: BLE001 - classify, record, keep the worker alive
            outcome, error = "failed", _classify(exc, settings, job_id, time.monotonic() - started)
        if outcome == "failed":  # the console line carries the full job id: the correlation id
            heartbeat.log.note(logging.WARNING, "failed: %s: %s", error[0], error[1][:300])
        else:
            heartbeat.log.note(logging.INFO, "%s", error[1])
        _with_db_retry(lambda: _finish(heartbeat, outcome, error=error if outcome == "failed" else None))
        return outcome


def _classify(exc: BaseException, settings, job_id: str, elapsed_s: float) -> tuple[str, str, dict]:
    """A failed job's (code, message, detail) for the tenant.

    The soft time limit is an exception raised asynchronously wherever the job happens to be, so code
    that wraps errors hides it: the npz and checkpoint readers turn any failure into `invalid_dataset` /
    `invalid_checkpoint` (the limit survives only as __context__), a DataLoader or a library converts it
    into its own error, and code that cleans up after it can fail in turn (a rollback on a connection
    cut mid-query), raising something new. Hence: the whole cause/context chain is searched for it, and
    any failure once the limit has passed is the limit's (Celery raises it exactly then).

    Unknown errors show the tenant a code, a message and the correlation id (the job id); the traceback
    goes to this worker's log only."""
    from worker.adaptation.errors import AdaptationError

    chain = _exception_chain(exc)
    if any(isinstance(e, SoftTimeLimitExceeded) for e in chain) or elapsed_s >= settings.job_time_limit_s:
        return "time_limit", f"the job ran past its time limit of {settings.job_time_limit_s} s", {
            "limit_s": settings.job_time_limit_s}
    if isinstance(exc, AdaptationError):
        return exc.code, exc.message, exc.detail
    if any(isinstance(e, MemoryError) or _is_out_of_memory(e) for e in chain):
        _release_device_memory()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return "out_of_memory", f"the job ran out of memory (try a smaller batch_size): {first}"[:500], {}
    log.error("job %s failed with an internal error (correlation_id=%s)", job_id, job_id,
              exc_info=(type(exc), exc, exc.__traceback__))
    return "internal", f"internal error ({type(exc).__name__}); the operator finds the details in the worker " \
        f"log under correlation id {job_id}", {}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    stack = [exc]
    while stack and len(seen) < 50:
        e = stack.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        stack += [e.__cause__, e.__context__]
    return seen


def _is_stale(heartbeat_at, stale_after: float) -> bool:
    from app.db.models import utcnow

    return heartbeat_at is None or (utcnow() - heartbeat_at).total_seconds() > stale_after


def _finish(heartbeat: Heartbeat, status: str, **kwargs) -> bool:
    """The final transition, in one transaction with the job's last log lines."""
    with heartbeat.log.transaction(heartbeat.db_url) as s:
        return repo.finish_job(s, heartbeat.job_id, heartbeat.worker, status, **kwargs)


def _outcome(metrics: dict) -> str:
    before, after = metrics.get("accuracy_before"), metrics.get("accuracy_after")
    text = f": accuracy {before:.1%} -> {after:.1%}" if before is not None and after is not None else ""
    ips = metrics.get("images_per_second")
    return text + (f", {ips:.0f} images/s" if ips else "")


def _with_db_retry(fn, attempts: int = 40, delay: float = 0.5, max_delay: float = 5.0):
    """Ride out a short database outage at the end of a job instead of throwing hours of work away:
    retry with backoff (about 3 minutes in all), then give up and let the reaper redeliver the job."""
    for i in range(attempts):
        try:
            return fn()
        except OperationalError:
            if i == attempts - 1:
                raise
            log.warning("database unavailable while finishing a job; retrying in %.1f s", delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


def _fetch(url: str, upload_id: str, dest: Path) -> Path:
    with session_scope(url) as s:
        upload = repo.get_upload(s, upload_id)
        blob_id = upload.blob_id
    copy_blob_to_file(url, blob_id, dest)
    return dest


def finite_json(value, path: str = "", bad: list[str] | None = None):
    """`value` with every non-finite float replaced by None (JSON has no NaN; PostgreSQL refuses it),
    and the paths that were replaced appended to `bad`."""
    if isinstance(value, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, f"{path}.{i}", bad) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if bad is not None:
            bad.append(path)
        return None
    return value


def _store_and_finish(url: str, settings, job_id: str, me: str, tmpdir: Path, result, job_log: joblog.JobLog
                      ) -> bool:
    """Write the artifacts' bytes (unsealed: invisible, referenced by nothing), then seal them, add
    their rows and record the job's final state in ONE transaction: a job that fails here or lost its
    claim leaves no blob behind. Non-finite metrics are stored as null and listed in
    `metrics.non_finite`, so metrics.json is valid JSON and both databases store the same thing."""
    bad: list[str] = []
    metrics = finite_json(result.metrics, bad=bad)
    if bad:
        metrics["non_finite"] = bad
    (tmpdir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str, allow_nan=False))
    (tmpdir / "history.json").write_text(json.dumps(finite_json(result.history), default=str, allow_nan=False))
    files = [("model.safetensors", result.model_path), ("metrics.json", tmpdir / "metrics.json"),
             ("history.json", tmpdir / "history.json")]
    if result.examples is not None:
        (tmpdir / "examples.json").write_text(json.dumps(finite_json(result.examples), allow_nan=False))
        files.append(("examples.json", tmpdir / "examples.json"))
    writers: list[tuple[str, BlobWriter]] = []
    kept: set[str] = set()
    try:
        for name, path in files:
            writer = BlobWriter(url)
            writers.append((name, writer))
            with open(path, "rb") as f:
                while data := f.read(settings.chunk_bytes):
                    writer.write(data)

        def commit() -> bool:
            with job_log.transaction(url) as s:  # the job's last log lines with its final state
                if not repo.finish_job(s, job_id, me, "succeeded", metrics=metrics):
                    return False
                blob_ids = [w.seal(s) for _, w in writers]
                repo.add_artifacts(s, [Artifact(job_id=job_id, name=name, blob_id=blob_id, size=w.size,
                                                sha256=w.sha256)
                                       for (name, w), blob_id in zip(writers, blob_ids)])
            kept.update(blob_ids)
            return True

        return _with_db_retry(commit)
    finally:
        for _, writer in writers:  # copies of existing content, or everything when nothing committed
            if writer.blob_id not in kept:
                writer.abort()


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator refusing (e.g. under ADAPTD_WORKER_MEMORY_LIMIT_BYTES)."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def _release_device_memory() -> None:
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
