"""`GET /metrics` in the Prometheus text format: jobs by state, queue depth, job durations (histogram
from started_at/finished_at) and upload bytes, from the database (PostgreSQL and SQLite)."""
from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from app.client import Client

pytestmark = pytest.mark.slow

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.eE+-]+|NaN|[+-]Inf)$')


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) adaptd_\w+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_metrics_exposition(service, assets, tmp_path):
    states = ("queued", "running", "succeeded", "failed", "cancelled")
    with Client(service.url) as c:
        # The gauges count every tenant's jobs; this client sees its own: compare the changes.
        counts_before = {st: len(c.jobs(status=st, limit=500)["items"]) for st in states}
        before = scrape(service.url)
        path = tmp_path / "fresh.npz"
        np.savez(path, x=np.random.default_rng().integers(0, 256, size=(32, 16, 16), dtype=np.uint8))
        upload = c.upload(path, "dataset")
        model = c.upload(assets["model"], "model")
        job = c.submit(method="source", model=model, data=upload, architecture="digit_cnn", num_classes=10,
                       arch_kwargs=assets["arch_kwargs"], preprocess=assets["preprocess"])
        job = c.wait(job["id"], timeout=180)
        assert job["status"] == "succeeded", job["error"]
        after = scrape(service.url)
        counts = {st: len(c.jobs(status=st, limit=500)["items"]) for st in states}

    assert after["adaptd_upload_bytes_total"] - before["adaptd_upload_bytes_total"] == upload["size"] + model["size"]
    assert after["adaptd_uploads_total"] - before["adaptd_uploads_total"] == 2
    for st, n in counts.items():
        key = f'adaptd_jobs{{state="{st}"}}'
        assert after[key] - before[key] == n - counts_before[st], st
    assert after["adaptd_queue_depth"] - before["adaptd_queue_depth"] == counts["queued"] - counts_before["queued"]
    assert after['adaptd_jobs{state="succeeded"}'] == before['adaptd_jobs{state="succeeded"}'] + 1

    buckets = [(k, v) for k, v in after.items() if k.startswith('adaptd_job_duration_seconds_bucket{state="succeeded"')]
    values = [v for _, v in buckets]
    assert values == sorted(values) and buckets[-1][0].endswith('le="+Inf"}')
    count = after['adaptd_job_duration_seconds_count{state="succeeded"}']
    assert values[-1] == count == counts["succeeded"]
    assert count == before['adaptd_job_duration_seconds_count{state="succeeded"}'] + 1
    added = after['adaptd_job_duration_seconds_sum{state="succeeded"}'] - \
        before['adaptd_job_duration_seconds_sum{state="succeeded"}']
    from datetime import datetime

    took = (datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00"))
            - datetime.fromisoformat(job["started_at"].replace("Z", "+00:00"))).total_seconds()
    assert added == pytest.approx(took, abs=0.01)
