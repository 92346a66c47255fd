"""How `adaptd` starts its child processes (the embedded worker of `adaptd up`, the demo's server).

Kept in one small place on purpose: packaging decides how a child finds this installation (module
name, interpreter flags), and nothing else in the CLI builds a child's command line."""
from __future__ import annotations

import signal
import sys

from ..capabilities import WORKER_MODULES, extra_missing_message, missing
from ..spawn import python_command


def adaptd_command(*args: str) -> list[str]:
    """argv that runs `adaptd ARGS` with this interpreter and this installation (app/spawn.py: a folder
    in the current directory with its own `app/` package cannot shadow it)."""
    return python_command("from app.cli import main; sys.exit(main())", *args)


def worker_command(concurrency: int, log_level: str) -> list[str]:
    """argv of one Celery worker process (worker/__main__.py): the CLI never imports the worker. Without
    the worker extra, a process that registers why jobs cannot run here and never takes one
    (worker/presence.py)."""
    absent = missing(WORKER_MODULES)
    if absent:
        print(f"adaptd: {extra_missing_message('worker', absent, 'jobs cannot run here')}", file=sys.stderr,
              flush=True)
        return python_command("from worker.presence import main; sys.exit(main())")
    return python_command("import app, worker; from worker.__main__ import main; main()",
                          "--concurrency", str(concurrency), "--log-level", log_level)


def die_with_parent() -> None:
    """Linux (a preexec_fn): the child gets SIGTERM when its parent dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
