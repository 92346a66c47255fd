"""The live workers of this deployment's queue and what they can run: `/readyz`, the reason a queued
job shows, and the submit-time check that some worker has the optional library a job needs."""
from __future__ import annotations

from dataclasses import dataclass

from ..capabilities import OPTIONAL_ARCHITECTURE_LIBRARIES
from ..config import Settings
from . import repo
from .session import session_scope


@dataclass(frozen=True)
class Fleet:
    workers: list[dict]
    fresh_s: float

    @property
    def capable(self) -> list[dict]:
        return [w for w in self.workers if w["can_run"]]

    @property
    def reason(self) -> str | None:
        """Why no job can run now, or None when some live worker can run jobs."""
        if self.capable:
            return None
        if not self.workers:
            return (f"no worker is running (none has sent a heartbeat in the last {self.fresh_s:g} s); start one "
                    "with `adaptd worker` (needs pip install 'adaptd[worker]')")
        return "no live worker can run jobs: " + "; ".join(f"{w['name']}: {w['reason']}" for w in self.workers)

    def missing_library(self, architecture: str) -> str | None:
        """The optional library the architecture needs that no live capable worker has (None: fine, or
        no capable worker to ask — the job then waits with `reason`)."""
        for prefix, library in OPTIONAL_ARCHITECTURE_LIBRARIES.items():
            if architecture.startswith(prefix) and self.capable and not any(
                    prefix in w["capabilities"].get("optional_architectures", []) for w in self.capable):
                return library
        return None


def fleet_in(s, settings: Settings) -> Fleet:
    fresh = settings.resolved_stale_after_s
    rows = repo.live_workers(s, settings.queue, fresh)
    return Fleet([{"name": w.name, "can_run": w.can_run, "reason": w.reason, "capabilities": w.capabilities,
                   "heartbeat_at": w.heartbeat_at.isoformat()} for w in rows], fresh)


def fleet(settings: Settings) -> Fleet:
    with session_scope(settings.resolved_database_url) as s:
        return fleet_in(s, settings)
