"""How `adaptd` starts its child processes (the embedded worker of `adaptd up`, the demo's server).

Kept in one small place on purpose: packaging decides how a child finds this installation (module
name, interpreter flags), and nothing else in the CLI builds a child's command line."""
from __future__ import annotations

import signal
import sys


def adaptd_command(*args: str) -> list[str]:
    """argv that runs `adaptd ARGS` with this interpreter."""
    return [sys.executable, "-m", "app.cli", *args]


def worker_command(concurrency: int, log_level: str) -> list[str]:
    """argv of one Celery worker process (worker/__main__.py): the CLI never imports the worker."""
    return [sys.executable, "-m", "worker", "--concurrency", str(concurrency), "--log-level", log_level]


def die_with_parent() -> None:
    """Linux (a preexec_fn): the child gets SIGTERM when its parent dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
