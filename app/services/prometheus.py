"""`GET /metrics` in the Prometheus text exposition format (0.0.4), computed from the database so that
every API process reports the same numbers (no per-process counters to aggregate)."""
from __future__ import annotations

from ..config import Settings
from ..db import repo
from ..db.session import session_scope

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) and v != int(v) else str(int(v))


def render(settings: Settings) -> str:
    with session_scope(settings.resolved_database_url) as s:
        by_state = repo.count_jobs_by_status(s)
        durations = repo.job_duration_histogram(s, [float(b) for b in DURATION_BUCKETS])
        n_uploads, upload_bytes = repo.upload_totals(s)
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

    metric("adaptd_jobs", "gauge", "Jobs by state.",
           [(f'{{state="{st}"}}', by_state.get(st, 0)) for st in STATES])
    metric("adaptd_queue_depth", "gauge", "Jobs waiting for a worker (state queued).",
           [("", by_state.get("queued", 0))])
    samples: list[tuple[str, float]] = []
    for st in ("succeeded", "failed", "cancelled"):
        h = durations.get(st, {"count": 0, "sum": 0.0, "buckets": [0] * len(DURATION_BUCKETS)})
        for le, c in zip(DURATION_BUCKETS, h["buckets"]):
            samples.append((f'_bucket{{state="{st}",le="{le}"}}', c))
        samples.append((f'_bucket{{state="{st}",le="+Inf"}}', h["count"]))
        samples.append((f'_sum{{state="{st}"}}', round(h["sum"], 3)))
        samples.append((f'_count{{state="{st}"}}', h["count"]))
    out.append("# HELP adaptd_job_duration_seconds Run time of finished jobs (started_at to finished_at).")
    out.append("# TYPE adaptd_job_duration_seconds histogram")
    out.extend(f"adaptd_job_duration_seconds{suffix} {_num(v)}" for suffix, v in samples)
    metric("adaptd_uploads_total", "counter", "Uploads stored (deduplicated ones included).", [("", n_uploads)])
    metric("adaptd_upload_bytes_total", "counter", "Bytes uploaded (deduplicated ones included).",
           [("", upload_bytes)])
    return "\n".join(out) + "\n"
