"""Real service processes for the tests: the API under uvicorn and Celery workers, as a user runs them
(`adaptd api`, `adaptd worker`, `adaptd up`), against real PostgreSQL + Redis or the embedded default."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("ADAPTD_TEST_PG_ADMIN", "postgresql://root@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ADAPTD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_pg_database() -> tuple[str, str]:
    """A fresh PostgreSQL database for one test session. Returns (name, SQLAlchemy URL)."""
    import psycopg

    name = f"adaptd_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Service:
    """An API process plus worker processes sharing one environment."""

    env: dict
    log_dir: Path
    api_port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_level: str = "warning"  # "info" writes uvicorn's access log (tests/security reads it)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def migrate(self) -> None:
        """Upgrade the service's database to head (alembic), before its processes start."""
        done = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=REPO, env=self.env,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"alembic upgrade failed:\n{done.stderr[-4000:]}")

    def start_api(self) -> None:
        self.api = self._spawn(["api", "--port", str(self.api_port), "--log-level", self.log_level], "api")
        self.wait_ready(workers=False)  # its workers start next

    def start_worker(self) -> subprocess.Popen:
        proc = self._spawn(["worker", "--concurrency", "1", "--log-level", "info"], f"worker{len(self.workers)}")
        self.workers.append(proc)
        return proc

    def start_embedded(self) -> None:
        """`adaptd up`: API + worker in one command."""
        self.api = self._spawn(["up", "--port", str(self.api_port), "--log-level", self.log_level], "up")
        self.wait_ready()

    def wait_ready(self, timeout: float = 120, workers: bool = True) -> None:
        """/readyz is 200 (database, broker and a worker that can run jobs); with `workers=False`,
        only the database and the broker need to be up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited ({self.api.returncode}); see {self.log_dir}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    return
                checks = r.json()["error"]["detail"]["checks"] if r.status_code == 503 else {}
                if not workers and checks.get("database") == checks.get("broker") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"API not ready after {timeout} s; see {self.log_dir}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))

    @staticmethod
    def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None:
                self.stop_process(proc)


@contextmanager
def pg_service(log_dir: Path, **env: str) -> Iterator[Service]:
    """The API and one worker on a fresh, migrated PostgreSQL database and Redis (a queue of their own),
    `env` over the defaults; stopped and the database dropped after."""
    name, url = create_pg_database()
    service = Service(env=base_env(**{"ADAPTD_DATABASE_URL": url, "ADAPTD_BROKER_URL": REDIS_URL,
                                      "ADAPTD_QUEUE": f"adaptd-test-{uuid.uuid4().hex[:8]}",
                                      "ADAPTD_HOME": str(log_dir / "home"), **env}), log_dir=log_dir)
    try:
        service.migrate()
        service.start_api()
        service.start_worker()
        yield service
    finally:
        service.stop()
        drop_pg_database(name)


def base_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTD_")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ADAPTD_HEARTBEAT_INTERVAL_S": "0.5"})
    env.update(overrides)
    return env
