"""Repairs what a crash can leave behind: a job committed but never enqueued (API died between the
two), or a running job whose heartbeat stopped (worker frozen or killed with no redelivery). Both are
re-enqueued; the task's atomic claim makes duplicates harmless, and its attempt count turns a job that
keeps killing workers into `worker_lost`. Every ADAPTD_BLOB_SWEEP_INTERVAL_S it also sweeps abandoned blob
bytes (app/storage/sweep.py)."""
from __future__ import annotations

import logging
import threading
import time

from app.config import Settings
from app.db import repo
from app.db.session import session_scope
from app.queue import enqueue_job
from app.storage.sweep import sweep

log = logging.getLogger("adaptd.reaper")


def reap_once(settings: Settings, celery) -> list[str]:
    with session_scope(settings.resolved_database_url) as s:
        ids = (repo.stuck_queued_jobs(s, settings.reaper_queued_after_s)
               + repo.stale_running_jobs(s, settings.resolved_stale_after_s))
    for job_id in ids:
        try:
            enqueue_job(celery, job_id, settings.queue)
            log.info("re-enqueued job %s", job_id)
        except Exception:  # noqa: BLE001 - broker still down: next round
            log.warning("could not re-enqueue job %s", job_id, exc_info=True)
    return ids


class Reaper(threading.Thread):
    def __init__(self, settings: Settings, celery):
        super().__init__(daemon=True, name="adaptd-reaper")
        self.settings, self.celery = settings, celery
        self._halt = threading.Event()  # not `_stop`: threading.Thread has a method of that name

    def run(self) -> None:
        next_sweep = time.monotonic()  # the first round sweeps too: what the last crash left
        while not self._halt.wait(self.settings.reaper_interval_s):
            try:
                reap_once(self.settings, self.celery)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.settings.blob_sweep_interval_s
                    sweep(self.settings)
            except Exception:  # noqa: BLE001 - database down: next round
                log.warning("reaper round failed", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
