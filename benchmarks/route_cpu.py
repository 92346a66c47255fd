"""CPU per request of `GET /v1/jobs/{id}` by each way it can be answered, against `GET /healthz`: a full id
(answered in front of the framework, app/api/hotpath.py), an 8-character prefix and a missing full id (404;
both go on to the route). The ASGI app is called in this process, without uvicorn or sockets, 200 requests
at a time (so the shared reads batch as under pollers), on a fresh SQLite database holding a few finished
jobs. Prints requests per CPU-second of this process for each phase and round, and each against healthz:
CPU time, unlike a rate, barely moves with the machine's other load.

    python benchmarks/route_cpu.py [--requests 12000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import Service, base_env  # noqa: E402

CONCURRENCY = 200


def fresh_database() -> list[str]:
    """Point the settings at a migrated SQLite database in a temporary folder; returns its jobs' ids."""
    home = Path(tempfile.mkdtemp(prefix="adaptd-route-cpu-"))
    url = f"sqlite:///{home / 'adaptd.db'}"
    os.environ.update(ADAPTD_HOME=str(home), ADAPTD_DATABASE_URL=url)
    Service(env=base_env(ADAPTD_HOME=str(home), ADAPTD_DATABASE_URL=url), log_dir=home).migrate()
    from app.db.models import Job
    from app.db.session import session_scope

    ids = [str(uuid.uuid4()) for _ in range(4)]
    with session_scope(url) as s:
        for job_id in ids:
            s.add(Job(id=job_id, status="succeeded", method="tent", params={"lr": 1e-3, "momentum": 0.9},
                      spec={"method": "tent", "params": {"lr": 1e-3}}, metrics={"accuracy": 0.9, "loss": 0.1}))
    return ids


async def get(app, path: str) -> int:
    sent = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


async def measure(app, phases: dict[str, list[str]], requests: int, rounds: int) -> None:
    for paths in phases.values():  # warm up: the middleware stack is built on the first request
        await get(app, paths[0])
    for r in range(rounds):
        rates = {}
        for name, paths in phases.items():
            start, statuses = time.process_time(), set()
            for _ in range(requests // CONCURRENCY):
                statuses |= set(await asyncio.gather(*(get(app, paths[i % len(paths)]) for i in range(CONCURRENCY))))
            rates[name] = (requests // CONCURRENCY * CONCURRENCY / (time.process_time() - start), sorted(statuses))
        base = rates["healthz"][0]
        print(f"round {r + 1} (load {os.getloadavg()[0]:.1f}): " + "; ".join(
            f"{name} {rate:,.0f}/CPU-s {statuses} ({rate / base:.2f}x)" for name, (rate, statuses) in rates.items()),
            flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=12000, help="per phase and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    ids = fresh_database()
    from app.main import create_app

    app = create_app()
    gc.collect()
    gc.freeze()  # as app.main's lifespan does at start-up
    phases = {"healthz": ["/healthz"], "job full id": [f"/v1/jobs/{j}" for j in ids],
              "job prefix": [f"/v1/jobs/{j[:8]}" for j in ids], "missing (404)": [f"/v1/jobs/{uuid.uuid4()}"]}
    asyncio.run(measure(app, phases, args.requests, args.rounds))


if __name__ == "__main__":
    main()
