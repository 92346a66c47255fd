"""job_id -> load spec -> claim -> fetch inputs -> run the engine -> store artifacts and metrics.

Idempotent: a job is claimed atomically (queued, or running with a stale heartbeat), artifacts are
content-addressed and replace earlier ones in the final transaction, and a redelivered message for a
finished job does nothing."""
from __future__ import annotations

import collections
import json
import math
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from app.config import get_settings
from app.db import repo
from app.db.models import Artifact
from app.db.session import session_scope
from app.queue import RUN_JOB_TASK
from .notify import notify_if_finished
from app.storage import copy_blob_to_file, store_file

from .celery_app import celery_app

log = logging.getLogger("adaptd.worker")
LIVE_STEPS_KEPT = 500  # per-step rows kept in jobs.live_steps while a job runs


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat(threading.Thread):
    """Writes liveness and the latest progress to the database every interval, and picks up cancel
    requests; the engine reads the flag between batches (no database call on the hot path)."""

    def __init__(self, db_url: str, job_id: str, worker: str, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.db_url, self.job_id, self.worker, self.interval = db_url, job_id, worker, interval
        self.done = self.total = 0
        self.phase = "starting"
        self.cancelled = threading.Event()
        self.lost = threading.Event()  # another worker took the job over (ours looked dead)
        self._stop = threading.Event()
        self.recent_steps: collections.deque = collections.deque(maxlen=LIVE_STEPS_KEPT)
        self._steps_lock = threading.Lock()
        self._steps_dirty = False

    def progress(self, done: int, total: int, phase: str) -> None:
        changed = phase != self.phase
        self.done, self.total, self.phase = done, total, phase
        if changed:
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
            with session_scope(self.db_url) as s:
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
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()


@celery_app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_job(self, job_id: str) -> str:
    settings = get_settings()
    url = settings.resolved_database_url
    me = worker_name()
    try:
        return _claim_and_run(self, job_id, settings, url, me)
    except OperationalError as exc:
        # Database down before the job started: try again shortly (the message is not lost).
        log.warning("database unavailable for job %s: %s", job_id, str(exc).splitlines()[0][:200])
        raise self.retry(countdown=5, max_retries=None) from None
    finally:
        notify_if_finished(settings, job_id)  # notify_url webhook: only for terminal jobs, at most once


def _claim_and_run(self, job_id: str, settings, url: str, me: str) -> str:
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
    log.info("job %s claimed by %s", job_id, me)
    heartbeat = Heartbeat(url, job_id, me, settings.heartbeat_interval_s)
    heartbeat.start()
    try:
        return _execute(url, settings, job_id, spec, me, heartbeat)
    finally:
        heartbeat.stop()


def _execute(url: str, settings, job_id: str, spec: dict, me: str, heartbeat: Heartbeat) -> str:
    # torch is imported here, in the child that runs the job, never in the prefork parent.
    from worker.adaptation.errors import AdaptationError, JobCancelled
    from worker.adaptation.runner import run

    from .spec import build_run_request

    with tempfile.TemporaryDirectory(prefix=f"adaptd-{job_id[:8]}-", dir=settings.artifact_dir) as tmp:
        tmpdir = Path(tmp)
        try:
            request = build_run_request(spec, tmpdir, lambda upload_id, dest: _fetch(url, upload_id, dest))
            result = run(request, heartbeat)
            artifacts = _with_db_retry(lambda: _store_artifacts(url, settings, job_id, tmpdir, result))
            ok = _with_db_retry(lambda: _finish(url, job_id, me, "succeeded", metrics=result.metrics,
                                                artifacts=artifacts))
            return "succeeded" if ok else "lost_claim"
        except JobCancelled:
            if heartbeat.lost.is_set():
                log.warning("job %s was taken over by another worker; stopping this copy", job_id)
                return "lost_claim"
            outcome, error = "cancelled", ("cancelled", "cancelled at the user's request", {})
        except AdaptationError as exc:
            outcome, error = "failed", (exc.code, exc.message, exc.detail)
        except SoftTimeLimitExceeded:
            outcome, error = "failed", ("time_limit", f"the job ran past its time limit of "
                                        f"{settings.job_time_limit_s} s", {"limit_s": settings.job_time_limit_s})
        except MemoryError:
            outcome, error = "failed", ("out_of_memory", "the worker ran out of host memory", {})
        except Exception as exc:  # noqa: BLE001 - classify, record, keep the worker alive
            if _is_out_of_memory(exc):
                outcome, error = "failed", ("out_of_memory", "the job ran out of memory (try a smaller "
                                            f"batch_size): {str(exc).splitlines()[0]}"[:500], {})
                _release_device_memory()
            else:
                log.exception("job %s failed", job_id)
                outcome, error = "failed", ("internal", f"{type(exc).__name__}: {exc}"[:1000],
                                            {"traceback": traceback.format_exc()[-2000:]})
        _with_db_retry(lambda: _finish(url, job_id, me, outcome, error=error if outcome == "failed" else None))
        return outcome


def _is_stale(heartbeat_at, stale_after: float) -> bool:
    from app.db.models import utcnow

    return heartbeat_at is None or (utcnow() - heartbeat_at).total_seconds() > stale_after


def _finish(url: str, job_id: str, me: str, status: str, **kwargs) -> bool:
    with session_scope(url) as s:
        return repo.finish_job(s, job_id, me, status, **kwargs)


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


def _store_artifacts(url: str, settings, job_id: str, tmpdir: Path, result) -> list[Artifact]:
    (tmpdir / "metrics.json").write_text(json.dumps(result.metrics, indent=1, default=str))
    (tmpdir / "history.json").write_text(json.dumps(result.history, default=str))
    files = [("model.safetensors", result.model_path), ("metrics.json", tmpdir / "metrics.json"),
             ("history.json", tmpdir / "history.json")]
    if result.examples is not None:
        (tmpdir / "examples.json").write_text(json.dumps(result.examples))
        files.append(("examples.json", tmpdir / "examples.json"))
    out = []
    for name, path in files:
        blob_id, sha256, size = store_file(url, path, settings.chunk_bytes)
        out.append(Artifact(job_id=job_id, name=name, blob_id=blob_id, size=size, sha256=sha256))
    return out


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
