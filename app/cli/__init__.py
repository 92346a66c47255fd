"""The `adaptd` command (click): service commands in server.py, job commands in jobs.py, `methods` in
methods.py; shared options and exit codes in options.py, output in render.py, child processes in
spawn.py. Shell completion: `eval "$(adaptd completion bash)"` (or zsh, fish)."""
from __future__ import annotations

import click

from . import jobs, methods, server
from .options import EXIT_INTERRUPTED


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("adaptd")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(version=version(), prog_name="adaptd", message="%(prog)s %(version)s")
def cli() -> None:
    """Model adaptation as a service: adapt a deployed model to shifted data, without labels."""


@cli.command("completion", short_help="print the shell completion script (bash, zsh, fish)")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell completion script: eval "$(adaptd completion bash)"."""
    from click.shell_completion import get_completion_class

    click.echo(get_completion_class(shell)(cli, {}, "adaptd", "_ADAPTD_COMPLETE").source())
    return 0


for command in (*server.COMMANDS, *jobs.COMMANDS, methods.methods):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs a command and returns its exit code (click's usage errors: 2)."""
    try:
        rv = cli.main(args=argv, prog_name="adaptd", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("\ninterrupted", err=True)
        return EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else 0
