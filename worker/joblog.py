"""A job's own log (GET /v1/jobs/{id}/logs, `adaptd logs JOB`): the log records and Python warnings
emitted in this process while the job runs, buffered in memory and written with the job's heartbeats
and, last, in the transaction that makes the job final (so a reader that sees the final status sees
every line)."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy.orm import Session

from app.db import repo
from app.db.models import utcnow
from app.db.session import session_scope

MAX_LINES = 5000        # per job: a runaway loop must not fill the database
MAX_MESSAGE = 4000      # characters per line


class JobLog(logging.Handler):
    def __init__(self, job_id: str):
        super().__init__(level=logging.INFO)
        self.job_id = job_id
        self.setFormatter(logging.Formatter("%(message)s"))
        self._pending: list[tuple] = []
        self._kept = 0
        self._buffer_lock = threading.Lock()
        self.write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad format string must not break the job
            text = str(record.msg)
        level = record.levelname
        with self._buffer_lock:
            if self._kept < MAX_LINES:
                self._kept += 1
                if self._kept == MAX_LINES:
                    text, level = f"(log truncated at {MAX_LINES} lines)", "WARNING"
                self._pending.append((utcnow(), level, text[:MAX_MESSAGE]))

    @contextmanager
    def transaction(self, db_url: str) -> Iterator[Session]:
        """A session that holds the buffered lines and commits when the block ends (on failure the
        lines go back to the buffer). One at a time per job, so its lines are stored in order."""
        with self.write_lock:
            with self._buffer_lock:
                rows, self._pending = self._pending, []
            try:
                with session_scope(db_url) as s:
                    if rows:
                        repo.add_job_logs(s, self.job_id, rows)
                    yield s
            except BaseException:
                with self._buffer_lock:
                    self._pending[:0] = rows
                raise


@contextmanager
def capture(job_id: str) -> Iterator[JobLog]:
    """Every INFO+ record of this process (any thread) and every Python warning go to the job's log
    while the block runs; the `adaptd` loggers are let through at INFO."""
    handler = JobLog(job_id)
    root, ours = logging.getLogger(), logging.getLogger("adaptd")
    old_level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        ours.setLevel(old_level)
