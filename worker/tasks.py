"""job_id -> load spec -> claim -> fetch inputs -> run the engine -> store artifacts and metrics.

Idempotent: a job is claimed atomically (queued, or running with a stale heartbeat), artifacts are
content-addressed and replace earlier ones in the final transaction, and a redelivered message for a
finished job does nothing."""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import traceback
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from app.config import get_settings
from app.db import repo
from app.db.models import Artifact
from app.db.session import session_scope
from app.queue import RUN_JOB_TASK
from app.storage import copy_blob_to_file, store_file

from .celery_app import celery_app

log = logging.getLogger("adaptd.worker")
MAX_ATTEMPTS = 3


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
        self._stop = threading.Event()

    def progress(self, done: int, total: int, phase: str) -> None:
        changed = phase != self.phase
        self.done, self.total, self.phase = done, total, phase
        if changed:
            self.beat()  # phase changes are rare and worth showing at once

    def should_cancel(self) -> bool:
        return self.cancelled.is_set()

    def beat(self) -> None:
        try:
            with session_scope(self.db_url) as s:
                if repo.heartbeat(s, self.job_id, self.worker, self.done, self.total, self.phase):
                    self.cancelled.set()
        except Exception:  # noqa: BLE001 - a missed beat is not fatal; the next one retries
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
    stale_after = max(10.0, 5 * settings.heartbeat_interval_s)
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return "missing"
        if job.status in repo.TERMINAL:
            return job.status  # a redelivered message for a finished job
        if job.attempts >= MAX_ATTEMPTS:
            repo.fail_job(s, job_id, "worker_lost", f"the job was started {job.attempts} times and its worker "
                          "was lost each time (killed, out of host memory, or crashed)", {"attempts": job.attempts})
            return "failed"
        claimed = repo.claim_job(s, job_id, me, stale_after)
        spec = job.spec
        running_elsewhere = not claimed and job.status == "running"
    if not claimed:
        if running_elsewhere:
            # Another worker holds it, or a dead one whose heartbeat is not yet stale: look again later.
            raise self.retry(countdown=stale_after, max_retries=None)
        return "not_claimed"
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
            artifacts = _store_artifacts(url, settings, job_id, tmpdir, result)
            with session_scope(url) as s:
                ok = repo.finish_job(s, job_id, me, "succeeded", metrics=result.metrics, artifacts=artifacts)
            return "succeeded" if ok else "lost_claim"
        except JobCancelled:
            outcome, error = "cancelled", ("cancelled", "cancelled at the user's request", {})
        except AdaptationError as exc:
            outcome, error = "failed", (exc.code, exc.message, exc.detail)
        except SoftTimeLimitExceeded:
            outcome, error = "failed", ("time_limit", f"the job ran past its time limit of "
                                        f"{settings.job_time_limit_s} s", {"limit_s": settings.job_time_limit_s})
        except MemoryError:
            outcome, error = "failed", ("out_of_memory", "the worker ran out of host memory", {})
        except Exception as exc:  # noqa: BLE001 - classify, record, keep the worker alive
            if type(exc).__name__ == "OutOfMemoryError":
                outcome, error = "failed", ("out_of_memory", f"the device ran out of memory: {exc}"[:500], {})
                _release_device_memory()
            else:
                log.exception("job %s failed", job_id)
                outcome, error = "failed", ("internal", f"{type(exc).__name__}: {exc}"[:1000],
                                            {"traceback": traceback.format_exc()[-2000:]})
        with session_scope(url) as s:
            repo.finish_job(s, job_id, me, outcome, error=error if outcome == "failed" else None)
        return outcome


def _fetch(url: str, upload_id: str, dest: Path) -> Path:
    with session_scope(url) as s:
        upload = repo.get_upload(s, upload_id)
        blob_id = upload.blob_id
    copy_blob_to_file(url, blob_id, dest)
    return dest


def _store_artifacts(url: str, settings, job_id: str, tmpdir: Path, result) -> list[Artifact]:
    (tmpdir / "metrics.json").write_text(json.dumps(result.metrics, indent=1, default=str))
    (tmpdir / "history.json").write_text(json.dumps(result.history, default=str))
    out = []
    for name, path in [("model.safetensors", result.model_path), ("metrics.json", tmpdir / "metrics.json"),
                       ("history.json", tmpdir / "history.json")]:
        blob_id, sha256, size = store_file(url, path, settings.chunk_bytes)
        out.append(Artifact(job_id=job_id, name=name, blob_id=blob_id, size=size, sha256=sha256))
    return out


def _release_device_memory() -> None:
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
