"""Access: API keys (stored hashed) per tenant, tenant isolation (another tenant's ids answer 404),
per-tenant limits (413/429 naming the limit), deletion that frees bytes and refuses while in use, and
no key-less listening beyond loopback."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from app.client import ApiError, Client
from tests.helpers import blob_files, random_npz, tent_spec, upload_assets
from tests.services import REPO, base_env, pg_service

ADMIN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def keyed_service(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("keyed")
    with pg_service(log_dir, ADAPTD_AUTH="keys", ADAPTD_ADMIN_KEY=ADMIN,
                    ADAPTD_BLOB_DIR=str(log_dir / "blobs")) as service:
        yield service


def admin(service) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {ADMIN}"})


def make_key(service, tenant: str, **limits) -> dict:
    r = admin(service).post("/v1/admin/keys", json={"tenant": tenant, **limits})
    assert r.status_code == 201, r.text
    return r.json()


def sql(service, query: str, **params):
    engine = create_engine(service.env["ADAPTD_DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(text(query), params).all()
    engine.dispose()
    return rows


def test_keys_are_required_and_stored_hashed(keyed_service):
    url = keyed_service.url
    r = httpx.get(f"{url}/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer adk_nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/healthz").status_code == 200  # liveness stays open

    key = make_key(keyed_service, "acme")
    assert key["key"].startswith("adk_") and key["tenant"] == "acme"
    with Client(url, api_key=key["key"]) as c:
        assert c.jobs()["items"] == []
        r = c.http.post("/v1/admin/keys", json={"tenant": "x"})  # a tenant key is not an admin key
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    rows = sql(keyed_service, "select key_hash, prefix from api_keys where id = :i", i=key["id"])
    assert rows[0][0] == hashlib.sha256(key["key"].encode()).hexdigest()
    assert key["key"] not in str(sql(keyed_service, "select * from api_keys"))
    listed = admin(keyed_service).get("/v1/admin/keys").json()
    assert all(k["key"] is None for k in listed)

    revoked = admin(keyed_service).delete(f"/v1/admin/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    r = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key['key']}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_concurrent_keyed_reads_each_get_their_own_tenant(keyed_service, assets):
    """Keys of requests arriving together are read in one statement (app.db.batched): under concurrency
    each request still gets its own key's tenant (its job, or 404 for another tenant's), unknown and
    revoked keys get 401, and a key revoked now is refused by the very next request."""
    import asyncio

    a, b, gone = (make_key(keyed_service, t) for t in ("batch-a", "batch-b", "batch-gone"))
    assert admin(keyed_service).delete(f"/v1/admin/keys/{gone['id']}").status_code == 200
    with Client(keyed_service.url, api_key=a["key"]) as ca:
        job_id = ca.submit(tent_spec(upload_assets(ca, assets), assets, method="source"))["id"]
    expected = {a["key"]: 200, b["key"]: 404, gone["key"]: 401, "adk_unknown": 401}

    async def burst() -> list[tuple[str, int, dict]]:
        async with httpx.AsyncClient(base_url=keyed_service.url, timeout=60) as c:
            keys = list(expected) * 25

            async def one(key):
                r = await c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
                return key, r.status_code, r.json()
            return await asyncio.gather(*(one(k) for k in keys))

    for key, status, body in asyncio.run(burst()):
        assert status == expected[key], (key, status, body)
        if status == 200:
            assert body["id"] == job_id
        elif status == 401:
            assert body["error"]["code"] == "invalid_api_key"
    # a full id is answered in front of the framework (app/api/hotpath.py), a prefix by the route: the same
    with Client(keyed_service.url, api_key=a["key"]) as ca:
        ca.wait(job_id, timeout=300)  # finished: both reads see the same job
    auth = {"Authorization": f"Bearer {a['key']}"}
    full, prefix = (httpx.get(f"{keyed_service.url}/v1/jobs/{ref}", headers=auth) for ref in (job_id, job_id[:8]))
    assert full.status_code == prefix.status_code == 200 and full.content == prefix.content
    assert full.headers["content-type"] == prefix.headers["content-type"] == "application/json"
    assert admin(keyed_service).delete(f"/v1/admin/keys/{a['id']}").status_code == 200
    r = httpx.get(f"{keyed_service.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {a['key']}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_concurrent_job_lists_are_shared_per_tenant_and_query(keyed_service, assets):
    """Identical GET /v1/jobs requests arriving together share one read (services.jobs.page_reader):
    under concurrency each tenant still sees only its own jobs, a job submitted just before shows up,
    and a bad cursor or a value the database refuses (NUL) fails only its own request."""
    import asyncio

    a, b = make_key(keyed_service, "lists-a"), make_key(keyed_service, "lists-b")
    with Client(keyed_service.url, api_key=a["key"]) as ca:
        job_id = ca.submit(tent_spec(upload_assets(ca, assets), assets, method="source"))["id"]
    queries = {(a["key"], "?limit=5"): 200, (b["key"], "?limit=5"): 200, (a["key"], "?limit=5&cursor=bad"): 422,
               (b["key"], "?limit=5&name=a%00b"): 422}

    async def burst() -> list[tuple[tuple[str, str], int, dict]]:
        async with httpx.AsyncClient(base_url=keyed_service.url, timeout=60) as c:
            async def one(q):
                r = await c.get(f"/v1/jobs{q[1]}", headers={"Authorization": f"Bearer {q[0]}"})
                return q, r.status_code, r.json()
            return await asyncio.gather(*(one(q) for q in list(queries) * 20))

    for (key, query), status, body in asyncio.run(burst()):
        assert status == queries[(key, query)], (key, query, status, body)
        ids = [j["id"] for j in body.get("items", [])]
        if key == a["key"] and status == 200:
            assert job_id in ids
        elif key == b["key"]:
            assert ids == []


def test_tenants_cannot_see_each_other(keyed_service, assets, tmp_path):
    a, b = make_key(keyed_service, "tenant-a"), make_key(keyed_service, "tenant-b")
    with Client(keyed_service.url, api_key=a["key"]) as ca, Client(keyed_service.url, api_key=b["key"]) as cb:
        uploads = upload_assets(ca, assets)
        job = ca.wait(ca.submit(tent_spec(uploads, assets, method="source"))["id"], timeout=300)
        assert job["status"] == "succeeded"
        for path in (f"/v1/jobs/{job['id']}", f"/v1/uploads/{uploads['model']['id']}",
                     f"/v1/jobs/{job['id']}/artifacts/model.safetensors", f"/v1/jobs/{job['id']}/events"):
            r = cb.http.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text)
        assert cb.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert cb.http.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert cb.http.delete(f"/v1/uploads/{uploads['model']['id']}").status_code == 404
        assert job["id"] not in [j["id"] for j in cb.jobs()["items"]]
        # B cannot run a job on A's uploads either
        r = cb.http.post("/v1/jobs", json=tent_spec(uploads, assets))
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_upload"
        # the same Idempotency-Key in two tenants makes two jobs
        spec = tent_spec(uploads, assets, method="source")
        first = ca.submit(spec, idempotency_key="same")
        b_uploads = upload_assets(cb, assets)
        second = cb.submit(tent_spec(b_uploads, assets, method="source"), idempotency_key="same")
        assert first["id"] != second["id"]


def test_per_tenant_limits(keyed_service, assets, tmp_path):
    key = make_key(keyed_service, "small", max_concurrent_jobs=1, max_upload_bytes=1024 * 1024,
                   max_storage_bytes=int(2.5 * 1024 * 1024))
    with Client(keyed_service.url, api_key=key["key"]) as c:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(1024 * 1024 + 1))
        with pytest.raises(ApiError) as err:
            c.upload(big, "dataset")
        assert err.value.status == 413 and err.value.code == "payload_too_large"
        assert err.value.detail["limit_bytes"] == 1024 * 1024

        part = tmp_path / "part.bin"
        for i in range(2):
            part.write_bytes(os.urandom(1000 * 1024))
            c.upload(part, "dataset")
        part.write_bytes(os.urandom(1000 * 1024))
        with pytest.raises(ApiError) as err:
            c.upload(part, "dataset")
        assert err.value.status == 413 and err.value.code == "storage_quota_exceeded"
        assert err.value.detail["limit_bytes"] == int(2.5 * 1024 * 1024)

    key2 = make_key(keyed_service, "one-at-a-time", max_concurrent_jobs=1)
    random_npz(tmp_path / "long.npz", n=20_000)
    with Client(keyed_service.url, api_key=key2["key"]) as c:
        model = c.upload(assets["model"], "model")
        data = c.upload(tmp_path / "long.npz", "dataset")
        spec = tent_spec({"model": model, "target": data}, assets, options={"batch_size": 4})
        running = c.submit(spec)
        with pytest.raises(ApiError) as err:
            c.submit(spec)
        assert err.value.status == 429 and err.value.code == "concurrent_job_limit"
        assert err.value.detail["limit"] == 1

        # deleting refuses while the job runs...
        r = c.http.delete(f"/v1/uploads/{data['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "upload_in_use"
        assert running["id"] in r.json()["error"]["detail"]["jobs"]
        r = c.http.delete(f"/v1/jobs/{running['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_active"
        c.cancel(running["id"])
        assert c.wait(running["id"], timeout=120)["status"] == "cancelled"
        # ...and frees the bytes afterwards
        assert c.http.delete(f"/v1/uploads/{data['id']}").status_code == 204
        assert sql(keyed_service, "select count(*) from blobs where sha256 = :h", h=data["sha256"])[0][0] == 0
        assert c.http.get(f"/v1/uploads/{data['id']}").status_code == 404


def test_deleting_a_job_removes_its_artifact_bytes(keyed_service, assets):
    """Here in files (ADAPTD_BLOB_DIR): each artifact's file goes with its row."""
    key = make_key(keyed_service, "cleaner")
    with Client(keyed_service.url, api_key=key["key"]) as c:
        uploads = upload_assets(c, assets)
        job = c.wait(c.submit(tent_spec(uploads, assets))["id"], timeout=300)
        assert job["status"] == "succeeded"
        digests = [a["sha256"] for a in job["artifacts"]]
        files = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in blob_files(keyed_service)}
        assert set(digests) <= set(files)
        assert c.http.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert not any(files[d].exists() for d in digests)
        assert c.http.get(f"/v1/jobs/{job['id']}").status_code == 404
        for digest in digests:
            assert sql(keyed_service, "select count(*) from blobs where sha256 = :h", h=digest)[0][0] == 0
        assert sql(keyed_service, "select count(*) from blob_chunks c left join blobs b on b.id = c.blob_id "
                                  "where b.id is null")[0][0] == 0  # no orphaned chunks


def test_open_mode_refuses_to_listen_beyond_loopback(tmp_path):
    env = base_env(ADAPTD_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "api", "--host", "0.0.0.0", "--port", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ADAPTD_AUTH=keys" in proc.stderr
    env_keys = base_env(ADAPTD_HOME=str(tmp_path), ADAPTD_AUTH="keys")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "api", "--host", "0.0.0.0", "--port", "1"],
                          cwd=REPO, env=env_keys, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ADAPTD_ADMIN_KEY" in proc.stderr

