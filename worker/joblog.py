"""A job's own log (GET /v1/jobs/{id}/logs, `adaptd logs JOB`): what the worker says about the job
(`note`: claimed, each phase with its counts, the outcome; stored whatever the worker's console level)
plus the records and Python warnings that reach the worker's log while the job runs. Buffered in memory,
written with the job's heartbeats and, last, in the transaction that makes the job final (so a reader
that sees the final status sees every line)."""
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


log = logging.getLogger("adaptd.worker")


class JobLog(logging.Handler):
    def __init__(self, job_id: str):
        super().__init__(level=logging.INFO)
        self.job_id = job_id
        self.setFormatter(logging.Formatter("%(message)s"))
        self._pending: list[tuple] = []
        self._kept = 0
        self._buffer_lock = threading.Lock()
        self.write_lock = threading.Lock()

    def note(self, level: int, msg: str, *args) -> None:
        """A line about the job: always in the job's log; in the worker's console log (prefixed with the
        job id, the correlation id) when its level lets it through."""
        self._append(logging.getLevelName(level), msg % args if args else msg)
        if log.isEnabledFor(level):
            log.log(level, "job %s: " + msg, self.job_id, *args, extra={"job_log_noted": True})

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "job_log_noted", False):
            return  # stored already, by note()
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad format string must not break the job
            text = str(record.msg)
        self._append(record.levelname, text)

    def _append(self, level: str, text: str) -> None:
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
    """While the block runs, the records that reach this process's log (any thread, at the worker's
    level) and every Python warning also go to the job's log."""
    handler = JobLog(job_id)
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
