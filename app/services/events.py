"""Live progress of a job as Server-Sent Events (`GET /v1/jobs/{id}/events`).

The streams read the database (never another process's memory), so they work behind any number of API
processes. In each process one watcher polls, every `ADAPTD_EVENTS_POLL_S`, the few columns a worker's
write changes for all the jobs that have open streams there (one statement), and reads a job's full
state only when those changed, once for all its streams: open streams cost one small query per poll
interval and process, not one per stream.

    event: status     data: the job (as GET /v1/jobs/{id}), on connect and whenever its status changes
    event: progress   data: {done, total, fraction, phase, images_per_second, eta_s, batch_size}
    event: step       data: one per-step row {step, epoch, loss, entropy, ...} as the worker publishes them
    event: end        data: the final job; the stream closes after it

Every event carries `id: <last step sent>`; a client that reconnects with `Last-Event-ID` gets only the
steps after it. A connection lives at most `ADAPTD_EVENTS_MAX_S` and then closes without `end` (the
browser's EventSource, the CLI and the Python client reconnect); a comment line keeps idle proxies open.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Awaitable, Callable


from ..config import Settings
from ..db import repo
from ..db.session import read
from ..errors import ApiError
from ..contract.jobs import JobOut
from ..db.batched import per_loop
from .jobs import views_out

RETRY_MS = 2000
log = logging.getLogger("adaptd.events")


@dataclass
class Snapshot:
    job: JobOut
    steps: list[dict] | None  # None: not reloaded (nothing changed since the last poll)


def snapshot(c, job_id: str, tenant_id: str | None = None) -> Snapshot:
    """The job (404 when absent, or another tenant's) and its live steps, on a read connection."""
    job = views_out(repo.job_views(c, [job_id], tenant_id)).get(job_id)
    if job is None:
        raise ApiError("job_not_found", f"no job {job_id!r}")
    return Snapshot(job, repo.live_steps(c, job_id))


def _beat(job: JobOut) -> tuple:
    """What a worker's write changes (repo.job_beats reads the same columns)."""
    return job.status, job.heartbeat_at, job.progress.done, job.progress.phase


class Watcher:
    """One per process, event loop and database: polls for every watched job at once and keeps each
    job's latest Snapshot; a stream sleeps until its own job changes (or its keep-alive is due), so an
    idle stream costs nothing between keep-alives."""

    def __init__(self, url: str, interval_s: float):
        self.url, self.interval_s = url, interval_s
        self.watching: Counter[str] = Counter()  # job id -> open streams
        self.latest: dict[str, Snapshot | None] = {}  # None: the job is gone
        self.changed: dict[str, asyncio.Event] = {}  # set (and replaced) when latest[job] changes
        self.ok = True  # False after a failed poll: every stream closes, clients reconnect
        self._task: asyncio.Task | None = None

    def subscribe(self, first: Snapshot) -> None:
        job_id = first.job.id
        self.watching[job_id] += 1
        self._publish(job_id, first)  # just read: the freshest there is
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def unsubscribe(self, job_id: str) -> None:
        self.watching[job_id] -= 1
        if self.watching[job_id] <= 0:
            del self.watching[job_id]
            self.latest.pop(job_id, None)
            self.changed.pop(job_id, None)

    async def wait_change(self, job_id: str, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.changed[job_id].wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    def _publish(self, job_id: str, snap: Snapshot | None) -> None:
        self.latest[job_id] = snap
        event = self.changed.get(job_id)
        self.changed[job_id] = asyncio.Event()
        if event is not None:
            event.set()

    async def _run(self) -> None:
        while self.watching:
            await asyncio.sleep(self.interval_s)
            before = dict(self.latest)
            try:
                fresh = await read(self.url, self._poll, list(self.watching))
            except Exception:  # noqa: BLE001 - database trouble: the streams close and reconnect
                log.warning("event streams: poll failed; closing the streams", exc_info=True)
                self.ok = False
                for job_id in list(self.watching):
                    self._publish(job_id, self.latest.get(job_id))
                continue
            self.ok = True
            for job_id, snap in fresh.items():  # unless a stream subscribed (fresher) or left meanwhile
                if job_id in self.watching and self.latest.get(job_id) is before.get(job_id):
                    self._publish(job_id, snap)

    def _poll(self, c, job_ids: list[str]) -> dict[str, Snapshot | None]:
        """Fresh snapshots of the jobs whose beat changed; None for jobs that are gone."""
        beats = repo.job_beats(c, job_ids)
        out: dict[str, Snapshot | None] = {}
        for job_id in job_ids:
            seen = self.latest.get(job_id)
            if job_id not in beats:
                if seen is not None:
                    out[job_id] = None
            elif seen is None or beats[job_id] != _beat(seen.job):
                out[job_id] = snapshot(c, job_id)
        return out


def watcher(settings: Settings) -> Watcher:
    url = settings.resolved_database_url
    return per_loop(("events", url), lambda: Watcher(url, settings.events_poll_s))


def format_event(event: str | None, data: dict | str | None = None, event_id: int | None = None) -> str:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if data is not None:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), default=str)
        lines += [f"data: {line}" for line in text.splitlines() or [""]]
    return "\n".join(lines) + "\n\n"


class _Rate:
    """Images/s and ETA from the worker's heartbeat timestamps while the job is adapting."""

    def __init__(self) -> None:
        self.anchor: tuple[datetime, int] | None = None

    def update(self, job: JobOut, batch_size: int) -> tuple[float | None, float | None]:
        p, at = job.progress, job.heartbeat_at
        if job.status != "running" or p.phase != "adapting" or at is None:
            return None, None
        if self.anchor is None or p.done < self.anchor[1]:
            self.anchor = (at, p.done)
            return None, None
        seconds = (at - self.anchor[0]).total_seconds()
        batches = p.done - self.anchor[1]
        if seconds <= 0 or batches <= 0:
            return None, None
        per_s = batches / seconds
        return per_s * batch_size, max(0.0, (p.total - p.done) / per_s)


async def job_events(settings: Settings, first: Snapshot, last_event_id: str | None,
                     is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    url, job_id = settings.resolved_database_url, first.job.id
    try:
        last_step = int(last_event_id) if last_event_id else -1
    except ValueError:
        last_step = -1
    batch_size = int((first.job.spec.get("options") or {}).get("batch_size") or 0)
    rate = _Rate()
    started = last_ping = time.monotonic()
    sent_status = sent_progress = None
    snap = first
    hub = watcher(settings)
    hub.subscribe(first)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            job = snap.job
            if job.status != sent_status:
                sent_status = job.status
                yield format_event("status", job.model_dump_json(), last_step)
            progress = (job.progress.done, job.progress.total, job.progress.phase)
            if progress != sent_progress:
                sent_progress = progress
                ips, eta = rate.update(job, batch_size)
                yield format_event("progress", {**job.progress.model_dump(), "images_per_second": ips,
                                                "eta_s": eta, "batch_size": batch_size, "status": job.status},
                                   last_step)
            for row in snap.steps or ():
                step = row.get("step", -1)
                if isinstance(step, int) and step > last_step:
                    last_step = step
                    yield format_event("step", row, last_step)
            if job.status in repo.TERMINAL:
                yield format_event("end", job.model_dump_json(), last_step)
                return
            seen = snap
            while snap is seen:  # until the watcher has something new for this job
                now = time.monotonic()
                if now - started > settings.events_max_s:
                    return  # bounded lifetime: the client reconnects with Last-Event-ID
                if now - last_ping > settings.events_keepalive_s:
                    last_ping = now
                    yield ": keepalive\n\n"
                    if await is_disconnected():  # (uvicorn also cancels a stream whose client left)
                        return
                await hub.wait_change(job_id, min(settings.events_keepalive_s,
                                                  settings.events_max_s - (now - started)) + 0.01)
                if not hub.ok:
                    return
                snap = hub.latest.get(job_id)
                if snap is None:  # deleted
                    return
    finally:
        hub.unsubscribe(job_id)
