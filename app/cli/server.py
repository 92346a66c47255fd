"""Service commands: up (embedded API + worker), api, worker, migrate, demo."""
from __future__ import annotations

import os
import signal
import subprocess

import click

from ..capabilities import require_server
from .spawn import die_with_parent, worker_command


def serve_options(fn):
    fn = click.option("--log-level", default="info", show_default=True,
                      type=click.Choice(["critical", "error", "warning", "info", "debug"]))(fn)
    fn = click.option("--port", type=int, default=8000, show_default=True)(fn)
    return click.option("--host", default="127.0.0.1", show_default=True)(fn)


def _migrate():
    from ..config import get_settings
    from ..db.migrate import upgrade_head

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.resolved_database_url)
    return settings


def _serve(host: str, port: int, log_level: str) -> None:
    """ADAPTD_API_WORKERS processes on one listening socket. Nothing a request needs lives in one
    process's memory (job reads, keys, event streams and /metrics all read the database), so any process
    may answer any request."""
    import uvicorn

    from ..config import get_settings

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level=log_level,
                workers=get_settings().api_workers)


@click.command("up", short_help="embedded: API + one worker, nothing to configure")
@serve_options
def up(host, port, log_level) -> int:
    """Embedded: API + one worker, SQLite, local broker (nothing to configure)."""
    require_server("up")
    from ..auth import check_bind_allowed
    from ..config import get_settings

    check_bind_allowed(get_settings(), host)
    settings = _migrate()
    # Its own session: a Ctrl+C on the terminal reaches `up` alone, which then stops the worker warmly.
    worker = subprocess.Popen(worker_command(1, log_level), preexec_fn=die_with_parent, start_new_session=True)
    try:
        click.echo(f"adaptd: API on http://{host}:{port}  (embedded: {settings.resolved_database_url}, "
                   f"broker {settings.resolved_broker_url})", err=True)
        _serve(host, port, log_level)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


@click.command("api", short_help="the HTTP API alone")
@serve_options
def api(host, port, log_level) -> int:
    """The HTTP API alone (workers run elsewhere: adaptd worker)."""
    require_server("api")
    from ..auth import check_bind_allowed
    from ..config import get_settings

    settings = get_settings()
    check_bind_allowed(settings, host)
    if settings.database_url is None:  # embedded SQLite: create/upgrade it in place
        _migrate()
    _serve(host, port, log_level)
    return 0


@click.command("worker", short_help="a Celery worker (one per GPU)")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def worker(concurrency, log_level) -> int:
    """A Celery worker (one per GPU)."""
    require_server("worker")
    argv = worker_command(concurrency, log_level)
    os.execv(argv[0], argv)  # the worker takes this process over: signals reach it directly
    return 0  # not reached


@click.command("migrate", short_help="upgrade the configured database to head")
def migrate() -> int:
    """alembic upgrade head on the configured database."""
    require_server("migrate")
    settings = _migrate()
    click.echo(f"database at head: {settings.resolved_database_url}")
    return 0


@click.command("demo", short_help="adapt a digit CNN to shifted digits, end to end")
@click.option("--url", default=None, help="use a running server instead of starting an embedded one")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--keep", is_flag=True, help="leave the embedded server running")
def demo(url, port, keep) -> int:
    """Train a digit CNN, shift its data, adapt it with tent over HTTP, print accuracy before and after."""
    from ..demo import run_demo

    return run_demo(url=url, port=port, keep=keep)


COMMANDS = (up, api, worker, migrate, demo)
