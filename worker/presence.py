"""The worker's row in the `workers` table: what it can run (app/capabilities.py, then the engine
probe in a child process) and a heartbeat, from a thread of the worker's main process.

A worker that cannot run jobs (the worker extra missing) does not consume the queue at all: it
registers its reason, so `/readyz` and queued jobs say why nothing runs, and it fails jobs that have
waited `ADAPTD_UNRUNNABLE_AFTER_S` with `no_capable_worker` while no live worker can run them."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from app.capabilities import static_capabilities
from app.config import Settings
from app.db import repo
from app.db.session import session_scope
from app.db.fleet import fleet_in

log = logging.getLogger("adaptd.presence")


def worker_name() -> str:
    """host:pid: the worker's row here, and the job claims of its pool processes (worker/tasks.py)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_unrunnable_jobs(settings: Settings) -> list[str]:
    """Jobs queued longer than the bound while no live worker can run any job: failed, with the reason."""
    with session_scope(settings.resolved_database_url) as s:
        reason = fleet_in(s, settings).reason
        if reason is None:
            return []
        failed = repo.fail_old_queued_jobs(s, settings.unrunnable_after_s, "no_capable_worker",
                                           f"no worker could run this job within {settings.unrunnable_after_s:g} s: "
                                           f"{reason}", {"waited_s": settings.unrunnable_after_s})
    for job_id in failed:
        log.warning("job %s failed: no live worker can run jobs", job_id)
    return failed


class Presence(threading.Thread):
    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="adaptd-presence")
        self.settings, self.worker = settings, worker_name()
        self.capabilities = static_capabilities()
        self._halt = threading.Event()

    def register(self) -> None:
        c = self.capabilities
        with session_scope(self.settings.resolved_database_url) as s:
            repo.register_worker(s, self.worker, self.settings.queue, bool(c["can_run"]), c.get("reason"), c)

    def run(self) -> None:
        self._safely(self.register)
        if self.capabilities["worker_extra"]:  # the engine imported for real in a child: device, torch
            from .probe import probe_in_child

            self.capabilities = {**self.capabilities, **probe_in_child()}
            if not self.capabilities["can_run"]:
                log.error("this worker cannot run jobs: %s", self.capabilities["reason"])
            self._safely(self.register)
        while not self._halt.wait(self.settings.heartbeat_interval_s):
            self._safely(self.beat)

    def beat(self) -> None:
        with session_scope(self.settings.resolved_database_url) as s:
            alive = repo.worker_heartbeat(s, self.worker)
        if not alive:
            self.register()
        fail_unrunnable_jobs(self.settings)

    def _safely(self, fn) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - database down: the next beat retries
            log.warning("worker presence update failed", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        try:
            with session_scope(self.settings.resolved_database_url) as s:
                repo.remove_worker(s, self.worker)
        except Exception:  # noqa: BLE001 - the row then goes stale and is ignored
            pass


def main() -> int:
    """`adaptd worker` where the worker extra is missing: register the reason and keep the heartbeat (and
    the bounded wait of queued jobs) until SIGTERM/SIGINT; never consume the queue."""
    from app.config import get_settings

    presence = Presence(get_settings())

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    presence.start()
    try:
        presence.join()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        presence.stop()
    return 0
