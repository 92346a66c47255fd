"""The command line of a child `adaptd` process (the embedded worker of `adaptd up`, the demo's server)
that runs the very code this process imported.

`python -m app.cli` would put the current directory first on sys.path, so a folder holding its own
`app/` package (the usual FastAPI layout) would shadow ours and the worker would never start. The child
instead replaces that entry by the folder our `app` package was imported from: an installed
site-packages, or the checkout a developer runs from."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)


def python_command(code: str, *args: str) -> list[str]:
    """`python -c code args...` with our package root, not the current directory, first on sys.path."""
    return [sys.executable, "-c", f"import sys; sys.path[0] = {ROOT!r}\n{code}", *args]
