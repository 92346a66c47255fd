"""Live progress of a job as Server-Sent Events (`GET /v1/jobs/{id}/events`).

The stream polls the database (never process memory), so it works behind any number of API processes:

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
from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..db import repo
from ..db.session import session_scope
from ..errors import ApiError
from ..contract.jobs import JobOut
from .jobs import to_out

RETRY_MS = 2000
log = logging.getLogger("adaptd.events")


@dataclass
class Snapshot:
    job: JobOut
    steps: list[dict] | None  # None: not reloaded (nothing changed since the last poll)


def snapshot(url: str, job_id: str, seen_beat: object = None) -> Snapshot:
    """The job, plus its live steps unless the worker has not written since `seen_beat`."""
    with session_scope(url) as s:
        job = repo.get_job(s, job_id)
        if job is None:
            raise ApiError("job_not_found", f"no job {job_id!r}")
        out = to_out(job, repo.artifacts_of(s, job_id))
        fresh = seen_beat is None or _beat(out) != seen_beat or out.status in repo.TERMINAL
        steps = repo.live_steps(s, job_id) if fresh else None
    return Snapshot(out, steps)


def _beat(job: JobOut) -> tuple:
    return job.status, job.heartbeat_at, job.progress.done, job.progress.phase


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
            yield format_event("progress", {**job.progress.model_dump(), "images_per_second": ips, "eta_s": eta,
                                            "batch_size": batch_size, "status": job.status}, last_step)
        for row in snap.steps or ():
            step = row.get("step", -1)
            if isinstance(step, int) and step > last_step:
                last_step = step
                yield format_event("step", row, last_step)
        if job.status in repo.TERMINAL:
            yield format_event("end", job.model_dump_json(), last_step)
            return
        now = time.monotonic()
        if now - started > settings.events_max_s:
            return  # bounded lifetime: the client reconnects with Last-Event-ID
        if now - last_ping > settings.events_keepalive_s:
            last_ping = now
            yield ": keepalive\n\n"
        await asyncio.sleep(settings.events_poll_s)
        if await is_disconnected():
            return
        try:
            snap = await run_in_threadpool(snapshot, url, job_id, _beat(job))
        except Exception:  # noqa: BLE001 - database trouble: end this connection; the client reconnects
            log.warning("event stream of job %s: poll failed; closing the stream", job_id, exc_info=True)
            return
