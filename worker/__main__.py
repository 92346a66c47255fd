"""`python -m worker [--concurrency N] [--log-level L]`: one Celery worker on the configured queue.

`adaptd worker` and `adaptd up` start it as a process (app/cli/spawn.py), so the CLI never imports the
worker. Its output holds what a user can act on: no banner, no "Warm shutdown" line, no superuser
SecurityWarning (containers run as root by design; the JSON-only serializer is what keeps that safe).
"""
from __future__ import annotations

import argparse
import os
import warnings


def _quiet_warm_shutdown(sender, **_kwargs) -> None:
    """SIGTERM still means a warm shutdown (running jobs finish); it just is not announced on stdout."""
    from celery.apps.worker import install_worker_term_handler

    install_worker_term_handler(sender.controller, verbose=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adaptd worker")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    from celery.exceptions import SecurityWarning
    from celery.signals import worker_ready

    warnings.filterwarnings("ignore", category=SecurityWarning)
    from app.config import get_settings

    from .celery_app import celery_app

    worker_ready.connect(_quiet_warm_shutdown, weak=False)
    celery_app.worker_main(["--quiet", "worker", "--pool=prefork", f"--concurrency={args.concurrency}",
                            "-Q", get_settings().queue, f"--loglevel={args.log_level}",
                            "--without-gossip", "--without-mingle", "-n", f"adaptd-%h-{os.getpid()}"])


if __name__ == "__main__":
    main()
