"""Services for the hostile-tenant tests (issue 13): keys mode on PostgreSQL + Redis and on the embedded
SQLite default, each with an admin key and uvicorn's access log on. `*_api` services have no worker,
so submitted jobs stay queued (the limit races count queued jobs)."""
from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.services import REDIS_URL, Service, base_env, create_pg_database, drop_pg_database

ADMIN = "admin-" + uuid.uuid4().hex
BACKENDS = ["postgres", "sqlite"]


def start(tmp: Path, backend: str, worker: bool = True, **env_overrides) -> tuple[Service, str | None]:
    """(service, PostgreSQL database name or None)."""
    env = {"ADAPTD_AUTH": "keys", "ADAPTD_ADMIN_KEY": ADMIN, "ADAPTD_HOME": str(tmp / "home"),
           "ADAPTD_QUEUE": f"sec-{uuid.uuid4().hex[:8]}", **env_overrides}
    name = None
    if backend == "postgres":
        name, url = create_pg_database()
        env.update(ADAPTD_DATABASE_URL=url, ADAPTD_BROKER_URL=REDIS_URL)
    service = Service(env=base_env(**env), log_dir=tmp, log_level="info")
    if backend == "postgres":
        service.migrate()
    if backend == "sqlite" and worker:
        service.start_embedded()  # `adaptd up`: API + worker, SQLite, filesystem broker
    else:
        service.start_api()
        if worker:
            service.start_worker()
    return service, name


def database_url(service: Service) -> str:
    return service.env.get("ADAPTD_DATABASE_URL") or f"sqlite:///{service.env['ADAPTD_HOME']}/adaptd.db"


def sql(service: Service, query: str, **params) -> list:
    engine = create_engine(database_url(service))
    try:
        with engine.connect() as conn:
            return conn.execute(text(query), params).all()
    finally:
        engine.dispose()


def orphaned_blobs(service: Service) -> list:
    """Blobs that no upload and no artifact points at (sealed or not)."""
    return sql(service, "select id from blobs where id not in (select blob_id from uploads) "
                        "and id not in (select blob_id from artifacts)")


def admin(service: Service) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def tenant(service: Service, name: str | None = None, **limits) -> httpx.Client:
    """A new tenant's key, as an httpx client."""
    with admin(service) as a:
        r = a.post("/v1/admin/keys", json={"tenant": name or f"t{uuid.uuid4().hex[:8]}", **limits})
    assert r.status_code == 201, r.text
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {r.json()['key']}"}, timeout=120)


def _fixture(backend: str, worker: bool, **env):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory):
        service, name = start(tmp_path_factory.mktemp(f"sec-{backend}"), backend, worker, **env)
        yield service
        service.stop()
        if name:
            drop_pg_database(name)
    return fixture


# tests.security.boom: an allow-listed user architecture whose forward fails unclassified (test_error_details)
sec_postgres = _fixture("postgres", True, ADAPTD_ARCHITECTURE_MODULES="tests.security.boom")
sec_sqlite = _fixture("sqlite", True)
sec_postgres_api = _fixture("postgres", False)
sec_sqlite_api = _fixture("sqlite", False)


@pytest.fixture(params=BACKENDS)
def sec_service(request) -> Service:
    return request.getfixturevalue(f"sec_{request.param}")


@pytest.fixture(params=BACKENDS)
def sec_api(request) -> Service:
    return request.getfixturevalue(f"sec_{request.param}_api")


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished after {timeout} s")


def upload(client: httpx.Client, data: bytes, kind: str = "dataset", filename: str = "x.npz") -> dict:
    r = client.post("/v1/uploads", params={"kind": kind, "filename": filename}, content=data)
    assert r.status_code == 201, r.text
    return r.json()


def spec(model_id: str, data_id: str, assets: dict, **extra) -> dict:
    return {"method": "tent", "model": {"upload_id": model_id, "architecture": "digit_cnn", "num_classes": 10,
                                        "arch_kwargs": assets["arch_kwargs"]},
            "data": {"upload_id": data_id}, "preprocess": assets["preprocess"],
            "options": {"batch_size": 64}, **extra}
