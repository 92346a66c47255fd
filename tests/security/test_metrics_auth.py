"""Row 10: /metrics holds every tenant's job and byte counts, so in keys mode it needs the admin key or
the metrics token (ADAPTD_METRICS_TOKEN); anonymous and tenant callers get nothing."""
from __future__ import annotations

import httpx

from tests.security.conftest import ADMIN, start, tenant, upload
from tests.services import drop_pg_database

TOKEN = "metrics-token-for-tests"


def test_metrics_need_the_admin_key_or_the_metrics_token(tmp_path):
    service, name = start(tmp_path, "postgres", worker=False, ADAPTD_METRICS_TOKEN=TOKEN)
    try:
        with tenant(service) as c:
            upload(c, b"secret-sized upload" * 1000)
            r = c.get("/metrics")
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
        r = httpx.get(f"{service.url}/metrics")
        assert r.status_code == 401 and "adaptd_upload_bytes_total" not in r.text
        r = httpx.get(f"{service.url}/metrics", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        for credential in (ADMIN, TOKEN):
            r = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {credential}"})
            assert r.status_code == 200 and "adaptd_upload_bytes_total 19000" in r.text
    finally:
        service.stop()
        drop_pg_database(name)
