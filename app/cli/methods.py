"""`adaptd methods`: the adaptation methods and their parameters. Without a server configured it reads
this installation's catalogue (torch-free), so it works before anything runs."""
from __future__ import annotations

import os

import click

from .options import EXIT_OK, EXIT_USAGE, connection_options, guarded, make_client, output_options
from .render import json_text, method_listing


def _server_configured(url: str | None) -> bool:
    from ..client import read_config

    return bool(url or os.environ.get("ADAPTD_URL") or read_config().get("url"))


@click.command("methods", short_help="adaptation methods and their parameters")
@click.argument("name", required=False)
@connection_options
@output_options
@guarded
def methods(name, url, api_key, as_json, quiet) -> int:
    """The adaptation methods and their parameters (a server's when one is configured, else this
    installation's)."""
    if _server_configured(url):
        with make_client(url, api_key) as client:
            found = client.methods()
    else:
        from ..contract.catalog import catalogue_json

        found = catalogue_json()
    if name:
        found = [m for m in found if m["name"] == name]
        if not found:
            click.echo(f"error: unknown method {name!r}", err=True)
            return EXIT_USAGE
    for text in [json_text(found)] if as_json else method_listing(found):
        click.echo(text)
    return EXIT_OK
