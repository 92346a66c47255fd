"""`ADAPTD_API_WORKERS=2`: `adaptd api` serves one port from two processes, and any of them answers for
what another stored (nothing a request needs lives in one process's memory)."""
from __future__ import annotations

import os

import httpx
import psutil

from tests.services import Service, base_env


def test_two_api_processes_share_the_port_and_the_state(tmp_path):
    service = Service(env=base_env(ADAPTD_HOME=str(tmp_path / "home"), ADAPTD_API_WORKERS="2"), log_dir=tmp_path)
    service.start_api()  # embedded SQLite, migrated by `adaptd api` itself
    try:
        children = psutil.Process(service.api.pid).children(recursive=True)
        servers = [p for p in children if any("multiprocessing.spawn" in a for a in p.cmdline())]
        assert len(servers) == 2, [p.cmdline() for p in children]
        payload = os.urandom(100_000)
        upload = httpx.post(f"{service.url}/v1/uploads", params={"kind": "dataset"}, content=payload)
        assert upload.status_code == 201, upload.text
        # fresh connections: the kernel hands them to either process
        for _ in range(20):
            with httpx.Client(base_url=service.url) as c:
                r = c.get(f"/v1/uploads/{upload.json()['id']}")
                assert r.status_code == 200 and r.json()["sha256"] == upload.json()["sha256"]
                assert c.get("/v1/jobs", params={"limit": 5}).json() == {"items": [], "next_cursor": None}
    finally:
        service.stop()
