"""The installed adaptd version (declared once, in pyproject.toml)."""
from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("adaptd")
except metadata.PackageNotFoundError:  # a checkout run without installing it
    __version__ = "0+unknown"
