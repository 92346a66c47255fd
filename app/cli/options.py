"""The parser side of `adaptd`: exit codes, shared options, value parsing, and the mapping of errors to
exit codes. Commands live in jobs.py, methods.py and server.py; what they print in render.py.

Exit codes (for scripts): 0 succeeded (or the command did what it was asked), 1 the job failed,
2 usage error, 3 the job was cancelled, 4 connection or API error, 130 interrupted; `status` of a job
still queued or running exits 0.
"""
from __future__ import annotations

import functools
import json
from typing import Callable

import click

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_API, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
STATUS_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def connection_options(fn: Callable) -> Callable:
    """--url / --api-key; the environment and the config file come after them (app.client)."""
    fn = click.option("--api-key", default=None, metavar="KEY",
                      help="API key (else ADAPTD_API_KEY, then the config file)")(fn)
    return click.option("--url", default=None, metavar="URL",
                        help="server URL (else ADAPTD_URL, the config file, http://127.0.0.1:8000)")(fn)


def output_options(fn: Callable) -> Callable:
    fn = click.option("-q", "--quiet", is_flag=True, help="no progress output")(fn)
    return click.option("--json", "as_json", is_flag=True, help="print JSON on stdout")(fn)


def make_client(url: str | None, api_key: str | None):
    from ..client import Client, resolve_connection

    try:
        url, api_key = resolve_connection(url, api_key)
    except ValueError as exc:  # an unreadable config file
        raise click.UsageError(str(exc)) from None
    return Client(url, api_key)


def complete_job_id(ctx: click.Context, _param, incomplete: str) -> list:
    """Shell completion of JOB arguments: the tenant's recent job ids (silent when no server answers)."""
    try:
        with make_client(ctx.params.get("url"), ctx.params.get("api_key")) as client:
            client.http.timeout = 2.0
            items = client.jobs(limit=50)["items"]
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        return []
    from click.shell_completion import CompletionItem

    return [CompletionItem(j["id"], help=" ".join(filter(None, (j["status"], j["method"], j.get("name")))))
            for j in items if j["id"].startswith(incomplete)]


def job_argument(fn: Callable) -> Callable:
    return click.argument("job_id", metavar="JOB", shell_complete=complete_job_id)(fn)


# --- values --------------------------------------------------------------------------------------------

def parse_value(text: str):
    """JSON-typed when it parses (1e-3, true, [1,2], "x"), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_pairs(pairs, flag: str) -> dict:
    out = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        value = json.loads(text) if text.strip().startswith("[") else [float(v) for v in text.split(",")]
        return [float(v) for v in value]
    except (ValueError, TypeError):
        raise click.UsageError(f"{flag} takes comma-separated numbers (0.5,0.5,0.5), got {text!r}") from None


# --- errors -> exit codes ------------------------------------------------------------------------------

def guarded(fn: Callable[..., int]) -> Callable[..., int]:
    """Client commands: API and connection errors become exit 4 with a one-line message (usage errors
    are click's: exit 2)."""

    @functools.wraps(fn)
    def run(*args, **kwargs) -> int:
        import httpx

        from ..client import ApiError, resolve_connection

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("\ninterrupted (a submitted job goes on: adaptd status JOB)", err=True)
            return EXIT_INTERRUPTED
        except FileNotFoundError as exc:
            raise click.UsageError(str(exc)) from None
        except ApiError as exc:
            click.echo(f"error: {exc.code}: {exc.message} (HTTP {exc.status})", err=True)
            detail = exc.detail or {}
            for e in detail.get("errors", [])[:5]:
                click.echo(f"  {e.get('field') or '.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}", err=True)
            for job in detail.get("matches", [])[:10]:  # an ambiguous id prefix
                click.echo(f"  {job}", err=True)
            return EXIT_API
        except httpx.HTTPError as exc:
            url = resolve_connection(kwargs.get("url"), kwargs.get("api_key"))[0]
            click.echo(f"error: connection_failed: cannot reach the adaptd server at {url}: "
                       f"{type(exc).__name__}: {exc}", err=True)
            return EXIT_API

    return run
