"""Row 6: tenant limits hold under simultaneous requests, on both databases: 20 submits at once against a
concurrency limit of 1 -> exactly 1 accepted, in each of 20 trials; 20 uploads at once against a storage
quota that fits one -> exactly 1 stored. (Count-then-insert without a lock let several through.)"""
from __future__ import annotations

import os
import threading

import httpx

from tests.security.conftest import spec, tenant, upload

TRIALS, AT_ONCE = 20, 20


def _at_once(clients: list[httpx.Client], call) -> list[httpx.Response]:
    barrier = threading.Barrier(len(clients))
    out: list = [None] * len(clients)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        out[i] = call(clients[i], i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in out), "a request did not finish"
    return out


def test_concurrency_limit_is_atomic(sec_api, assets):
    with tenant(sec_api, max_concurrent_jobs=1) as owner:
        model = upload(owner, assets["model"].read_bytes(), "model", "m.safetensors")
        data = upload(owner, assets["target"].read_bytes())
        body = spec(model["id"], data["id"], assets)
        clients = [httpx.Client(base_url=owner.base_url, headers=owner.headers, timeout=120) for _ in range(AT_ONCE)]
        try:
            for trial in range(TRIALS):
                answers = _at_once(clients, lambda c, i: c.post("/v1/jobs", json=body))
                codes = sorted(r.status_code for r in answers)
                assert codes == [202] + [429] * (AT_ONCE - 1), (trial, codes, [r.text for r in answers if r.status_code >= 500])
                accepted = next(r.json() for r in answers if r.status_code == 202)
                assert owner.post(f"/v1/jobs/{accepted['id']}/cancel").json()["status"] == "cancelled"
        finally:
            for c in clients:
                c.close()


def test_storage_quota_is_atomic(sec_api):
    size = 64 * 1024
    with tenant(sec_api, max_storage_bytes=size + size // 2) as owner:
        clients = [httpx.Client(base_url=owner.base_url, headers=owner.headers, timeout=120) for _ in range(AT_ONCE)]
        try:
            for trial in range(TRIALS):
                answers = _at_once(clients, lambda c, i: c.post("/v1/uploads", params={"kind": "dataset"},
                                                                content=os.urandom(size)))
                codes = sorted(r.status_code for r in answers)
                assert codes == [201] + [413] * (AT_ONCE - 1), (trial, codes, [r.text for r in answers if r.status_code >= 500])
                assert {r.json()["error"]["code"] for r in answers if r.status_code == 413} == {"storage_quota_exceeded"}
                stored = next(r.json() for r in answers if r.status_code == 201)
                assert owner.delete(f"/v1/uploads/{stored['id']}").status_code == 204
        finally:
            for c in clients:
                c.close()
