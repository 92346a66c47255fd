"""Errors the engine raises. `code` is the stable snake_case error code a failed job reports."""
from __future__ import annotations


class AdaptationError(Exception):
    """An input-caused (or otherwise explained) failure with a stable error code."""

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}


class JobCancelled(Exception):
    """Raised between batches when the job's cancellation was requested."""
