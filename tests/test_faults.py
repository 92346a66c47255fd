"""Faults, really done: kill -9 a worker mid-job, freeze one, lose an enqueue, hit the time limit,
stop and restart Redis and PostgreSQL. Private PostgreSQL/Redis servers (tests/private_services.py)
so the machine's shared ones are never stopped."""
from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest

from app.client import Client
from tests.helpers import random_npz
from tests.private_services import PrivatePostgres, PrivateRedis, wait_for
from tests.services import Service, base_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def private_pg():
    pg = PrivatePostgres()
    yield pg
    pg.destroy()


@pytest.fixture(scope="module")
def private_redis():
    r = PrivateRedis()
    yield r
    r.destroy()


@pytest.fixture
def make_service(private_pg, private_redis, tmp_path):
    """A fresh database + queue on the private servers, migrated, with fast heartbeats and reaper."""
    started: list[Service] = []

    def make(workers: int = 1, **env_overrides) -> Service:
        url = private_pg.create_database(f"faults_{uuid.uuid4().hex[:8]}")
        log_dir = tmp_path / f"svc{len(started)}"
        log_dir.mkdir()
        settings = {"ADAPTD_DATABASE_URL": url, "ADAPTD_BROKER_URL": private_redis.url,
                    "ADAPTD_QUEUE": f"faults-{uuid.uuid4().hex[:8]}", "ADAPTD_HOME": str(log_dir / "home"),
                    "ADAPTD_HEARTBEAT_INTERVAL_S": "0.5", "ADAPTD_STALE_AFTER_S": "6",
                    "ADAPTD_REAPER_INTERVAL_S": "1", "ADAPTD_REAPER_QUEUED_AFTER_S": "3"}
        env = base_env(**{**settings, **{k: str(v) for k, v in env_overrides.items()}})
        service = Service(env=env, log_dir=log_dir)
        service.migrate()
        started.append(service)
        service.start_api()
        for _ in range(workers):
            service.start_worker()
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "long.npz"
    random_npz(path, n=6000)
    return path


def submit(client: Client, assets, data_path, method="tent", batch_size=4) -> dict:
    model = client.upload(assets["model"], "model")
    data = client.upload(data_path, "dataset")
    return client.submit({"method": method, "model": {"upload_id": model["id"], "architecture": "digit_cnn",
                                                      "num_classes": 10, "arch_kwargs": assets["arch_kwargs"]},
                          "data": {"upload_id": data["id"]}, "preprocess": assets["preprocess"],
                          "options": {"batch_size": batch_size}})


def running(client: Client, job_id: str, attempt: int = 1):
    def check():
        j = client.job(job_id)
        return j if j["status"] == "running" and j["attempts"] == attempt and j["progress"]["done"] > 0 else None
    return check


def holder_pid(service: Service, job_id: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(service.env["ADAPTD_DATABASE_URL"])
    with engine.connect() as conn:
        worker = conn.execute(text("select worker from jobs where id = :i"), {"i": job_id}).scalar()
    engine.dispose()
    return int(worker.rsplit(":", 1)[1])


def test_kill_9_mid_job_is_redelivered_and_completes(make_service, assets, long_data):
    service = make_service()
    with Client(service.url) as c:
        job = submit(c, assets, long_data)
        wait_for(running(c, job["id"]), 120, message="job running")
        victim = holder_pid(service, job["id"])
        os.kill(victim, signal.SIGKILL)
        final = c.wait(job["id"], timeout=180)
        assert final["status"] == "succeeded", (final, service.logs())
        assert final["attempts"] == 2
        assert holder_pid(service, job["id"]) != victim
        assert len(final["artifacts"]) == 4


def test_job_that_keeps_killing_workers_fails_with_worker_lost(make_service, assets, long_data):
    service = make_service(ADAPTD_MAX_ATTEMPTS=2)
    with Client(service.url) as c:
        job = submit(c, assets, long_data)
        for attempt in (1, 2):
            wait_for(running(c, job["id"], attempt), 120, message=f"attempt {attempt} running")
            os.kill(holder_pid(service, job["id"]), signal.SIGKILL)
        final = c.wait(job["id"], timeout=120)
        assert final["status"] == "failed", final
        assert final["error"]["code"] == "worker_lost" and final["attempts"] == 2
        # the worker itself survived and takes the next job
        ok = c.wait(submit(c, assets, assets["target"], method="source", batch_size=64)["id"], timeout=120)
        assert ok["status"] == "succeeded"


def test_lost_enqueue_is_repaired_by_the_reaper(make_service, assets):
    """A crash between the job's commit and its enqueue: the row exists, no message does."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.db.models import Job

    service = make_service()
    with Client(service.url) as c:
        template = c.wait(submit(c, assets, assets["target"], method="source", batch_size=64)["id"], timeout=120)
        engine = create_engine(service.env["ADAPTD_DATABASE_URL"])
        orphan_id = str(uuid.uuid4())
        with Session(engine) as s:
            s.add(Job(id=orphan_id, status="queued", method="source", params={}, spec=template["spec"]))
            s.commit()
        engine.dispose()
        final = c.wait(orphan_id, timeout=60)
        assert final["status"] == "succeeded" and final["attempts"] == 1


def test_frozen_worker_is_detected_and_its_job_taken_over(make_service, assets, long_data):
    service = make_service(workers=2)
    with Client(service.url) as c:
        job = submit(c, assets, long_data)
        wait_for(running(c, job["id"]), 120, message="job running")
        frozen = holder_pid(service, job["id"])
        os.kill(frozen, signal.SIGSTOP)  # heartbeat stops, the process stays
        try:
            final = c.wait(job["id"], timeout=180)
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert final["status"] == "succeeded", (final, service.logs())
        assert final["attempts"] == 2 and holder_pid(service, job["id"]) != frozen
        time.sleep(3)  # the thawed copy notices it lost the job and stops without writing
        again = c.job(job["id"])
        assert again["status"] == "succeeded" and again["finished_at"] == final["finished_at"]
        assert holder_pid(service, job["id"]) != frozen


def test_time_limit_fails_the_job_and_the_worker_survives(make_service, assets, long_data):
    service = make_service(ADAPTD_JOB_TIME_LIMIT_S=3)
    with Client(service.url) as c:
        final = c.wait(submit(c, assets, long_data, batch_size=2)["id"], timeout=120)
        assert final["status"] == "failed" and final["error"]["code"] == "time_limit", final
        ok = c.wait(submit(c, assets, assets["target"], method="source", batch_size=64)["id"], timeout=120)
        assert ok["status"] == "succeeded"


def test_redis_restart_loses_no_job(make_service, private_redis, assets, long_data):
    service = make_service()
    with Client(service.url) as c:
        first = submit(c, assets, long_data)
        wait_for(running(c, first["id"]), 120, message="first job running")
        second = submit(c, assets, assets["target"], method="bn_adapt", batch_size=64)  # queued behind it
        private_redis.stop()
        try:
            ready = httpx.get(f"{service.url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["error"]["detail"]["checks"]["broker"] != "ok"
            third = submit(c, assets, assets["target"], method="source", batch_size=64)  # accepted, queued
            assert third["status"] == "queued"
        finally:
            private_redis.start()
        wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 200, 30, message="ready again")
        for job in (first, second, third):
            final = c.wait(job["id"], timeout=240)
            assert final["status"] == "succeeded", (final, service.logs())
            assert final["attempts"] == 1


def test_postgres_restart_loses_no_job(make_service, private_pg, assets, long_data):
    service = make_service(ADAPTD_STALE_AFTER_S=15)
    with Client(service.url) as c:
        job = submit(c, assets, long_data)
        wait_for(running(c, job["id"]), 120, message="job running")
        private_pg.stop()
        try:
            r = httpx.get(f"{service.url}/v1/jobs/{job['id']}", timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
            ready = httpx.get(f"{service.url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["error"]["detail"]["checks"]["database"] != "ok"
            time.sleep(2)
        finally:
            private_pg.start()
        final = c.wait(job["id"], timeout=240)
        assert final["status"] == "succeeded", (final, service.logs())
        assert final["attempts"] == 1 and len(final["artifacts"]) == 4


def test_out_of_memory_fails_the_job_and_the_worker_survives(make_service, assets, tmp_path):
    """A batch far too large for the worker's memory (capped at 6 GiB here): `out_of_memory`, then the
    same worker process runs the next job."""
    service = make_service(ADAPTD_WORKER_MEMORY_LIMIT_BYTES=6 * 1024**3)
    random_npz(tmp_path / "wide.npz", n=4096)
    with Client(service.url) as c:
        model = c.upload(assets["model"], "model")
        data = c.upload(tmp_path / "wide.npz", "dataset")
        spec = {"method": "tent", "model": {"upload_id": model["id"], "architecture": "digit_cnn",
                                            "num_classes": 10, "arch_kwargs": assets["arch_kwargs"]},
                "data": {"upload_id": data["id"]},
                "preprocess": {**assets["preprocess"], "size": 256}, "options": {"batch_size": 4096}}
        final = c.wait(c.submit(spec)["id"], timeout=180)
        assert final["status"] == "failed" and final["error"]["code"] == "out_of_memory", final
        assert "batch_size" in final["error"]["message"]
        first = holder_pid(service, final["id"])
        ok = c.wait(submit(c, assets, assets["target"], method="source", batch_size=64)["id"], timeout=120)
        assert ok["status"] == "succeeded"
        assert holder_pid(service, ok["id"]) == first  # the same pool process: it survived
