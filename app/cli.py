"""`adaptd` console script: up (embedded API + worker), api, worker, migrate, demo; and the client
commands submit, jobs, status, download, cancel, methods (app/cli_client.py)."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from .config import get_settings


def cmd_api(args) -> int:
    import uvicorn

    from .auth import check_bind_allowed
    from .db.migrate import upgrade_head

    settings = get_settings()
    check_bind_allowed(settings, args.host)
    if settings.database_url is None:  # embedded SQLite: create/upgrade it in place
        settings.home.mkdir(parents=True, exist_ok=True)
        upgrade_head(settings.resolved_database_url)
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def worker_argv(concurrency: int, loglevel: str = "info") -> list[str]:
    settings = get_settings()
    return ["worker", "--pool=prefork", f"--concurrency={concurrency}", "-Q", settings.queue,
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle", "-n", f"adaptd-%h-{os.getpid()}"]


def cmd_worker(args) -> int:
    # The worker is started by module name: the API package never imports the worker package (the
    # API image does not even contain it). exec keeps the process id, so signals reach Celery itself.
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *worker_argv(args.concurrency, args.log_level)]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_migrate(_args) -> int:
    from .db.migrate import upgrade_head

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.resolved_database_url)
    print(f"database at head: {settings.resolved_database_url}")
    return 0


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM when `adaptd up` dies, even by SIGKILL (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cmd_up(args) -> int:
    """Embedded: migrate, start one worker process, serve the API; stop the worker on exit."""
    from .auth import check_bind_allowed

    settings = get_settings()
    check_bind_allowed(settings, args.host)
    settings.home.mkdir(parents=True, exist_ok=True)
    from .db.migrate import upgrade_head

    upgrade_head(settings.resolved_database_url)
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--concurrency", "1",
                               "--log-level", args.log_level], preexec_fn=_die_with_parent)
    try:
        import uvicorn

        print(f"adaptd: API on http://{args.host}:{args.port}  (embedded: {settings.resolved_database_url}, "
              f"broker {settings.resolved_broker_url})", flush=True)
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(url=args.url, port=args.port, keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptd", description="Model adaptation as a service.")
    sub = parser.add_subparsers(dest="command", required=True)

    def serve(p):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--log-level", default="info")

    p = sub.add_parser("up", help="embedded: API + one worker, SQLite, local broker")
    serve(p)
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("api", help="the HTTP API")
    serve(p)
    p.set_defaults(func=cmd_api)
    p = sub.add_parser("worker", help="a Celery worker (one per GPU)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("migrate", help="alembic upgrade head on the configured database")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("demo", help="train a digit CNN, shift its data, adapt it with tent over HTTP, "
                       "print accuracy before and after")
    p.add_argument("--url", default=None, help="use a running server instead of starting an embedded one")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep", action="store_true", help="leave the embedded server running")
    p.set_defaults(func=cmd_demo)
    from .cli_client import register as register_client_commands  # submit, jobs, status, download, ...

    register_client_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
