"""Load on the HTTP API with PostgreSQL + Redis behind it: many clients polling jobs while others upload.

Starts an API (and one worker) on a fresh PostgreSQL database and Redis, the way the tests do
(tests/services.py; dropped again at the end), or uses a running one given with --url (loopback
addresses only). Creates a few small `source` jobs on a digit CNN and a small npz it makes, waits for
them to finish, then for --duration seconds holds --pollers concurrent clients that poll
`GET /v1/jobs/{id}` (and every --list-every-th request `GET /v1/jobs?limit=20`) back to back, and
--uploaders concurrent clients that upload distinct 1–4 MiB bodies (`POST /v1/uploads`, octet-stream)
back to back. Prints a markdown table per operation: count, latency p50/p95/p99/max, throughput,
errors by status. Bounded: --duration, --max-requests, --max-upload-gib. Not part of the test run.

    .venv/bin/python benchmarks/load.py [--duration 30] [--pollers 200] [--uploaders 50]
        [--upload-mib 1-4] [--api-workers 1] [--url http://127.0.0.1:8000]

`adaptd api` runs one uvicorn process; --api-workers N > 1 runs `uvicorn app.main:create_app --factory
--workers N` with the same environment instead.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import platform
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1024 * 1024


# --- the service under test ------------------------------------------------------------------------

def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        sys.exit(f"load: cannot resolve {host!r}")
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        sys.exit(f"load: {url} is not a loopback address; this script only loads this machine")


class LocalStack:
    """API (1 or N uvicorn workers) + one Celery worker on a fresh PostgreSQL database and Redis."""

    def __init__(self, api_workers: int, log_dir: Path):
        from tests.services import REDIS_URL, Service, base_env, create_pg_database

        self.db_name, db_url = create_pg_database()
        self.env = base_env(ADAPTD_DATABASE_URL=db_url, ADAPTD_BROKER_URL=REDIS_URL,
                            ADAPTD_QUEUE=f"adaptd-load-{uuid.uuid4().hex[:8]}", ADAPTD_HOME=str(log_dir / "home"),
                            ADAPTD_MAX_UPLOAD_BYTES=str(64 * MiB))
        self.service = Service(env=self.env, log_dir=log_dir)
        self.api_workers = api_workers

    def start(self) -> str:
        svc = self.service
        svc.migrate()
        if self.api_workers > 1:
            log = open(svc.log_dir / "api.log", "ab")
            svc.api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
                 "--port", str(svc.api_port), "--workers", str(self.api_workers), "--log-level", "warning"],
                cwd=REPO, env=svc.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            svc.wait_ready()
        else:
            svc.start_api()
        svc.start_worker()
        return svc.url

    def pids(self) -> dict[str, list[int]]:
        import psutil

        def tree(proc):
            if proc is None or proc.poll() is not None:
                return []
            try:
                p = psutil.Process(proc.pid)
                return [p.pid] + [c.pid for c in p.children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
        return {"api": tree(self.service.api), "worker": [p for w in self.service.workers for p in tree(w)]}

    def stop(self) -> None:
        from tests.services import drop_pg_database

        self.service.stop()
        drop_pg_database(self.db_name)


# --- setup: a tiny model, a small data set, a few jobs ---------------------------------------------

def make_assets(out: Path) -> tuple[Path, Path]:
    """An untrained digit CNN (safetensors) and 256 random 16x16 digits-like images (npz)."""
    import torch

    from app.demo import ARCH_KWARGS
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors

    torch.manual_seed(0)
    model_path, data_path = out / "model.safetensors", out / "target.npz"
    save_safetensors(build_model("digit_cnn", 10, **ARCH_KWARGS), model_path)
    rng = np.random.default_rng(0)
    np.savez(data_path, x=rng.integers(0, 256, size=(256, 16, 16), dtype=np.uint8))
    return model_path, data_path


def create_jobs(url: str, n: int, wait_s: float, headers: dict[str, str]) -> list[str]:
    import httpx

    from app.demo import ARCH_KWARGS, PREPROCESS

    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=url, timeout=60, headers=headers) as c:
        model_path, data_path = make_assets(Path(tmp))
        ids = {}
        for kind, path in (("model", model_path), ("dataset", data_path)):
            r = c.post("/v1/uploads", params={"kind": kind, "filename": path.name}, content=path.read_bytes())
            r.raise_for_status()
            ids[kind] = r.json()["id"]
        jobs = []
        for i in range(n):
            r = c.post("/v1/jobs", json={
                "method": "source", "model": {"upload_id": ids["model"], "architecture": "digit_cnn",
                                              "num_classes": 10, "arch_kwargs": ARCH_KWARGS},
                "data": {"upload_id": ids["dataset"]}, "preprocess": PREPROCESS,
                "options": {"batch_size": 64, "seed": i, "device": "cpu"}})
            r.raise_for_status()
            jobs.append(r.json()["id"])
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            states = [c.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]
            if all(s in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(0.5)
        states = Counter(c.get(f"/v1/jobs/{j}").json()["status"] for j in jobs)
    print(f"jobs: {dict(states)}", file=sys.stderr)
    return jobs


# --- the load --------------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.bytes: Counter = Counter()
        self.in_flight = Counter()
        self.peak_in_flight = Counter()
        self.requests = 0

    def start(self, op: str) -> None:
        self.in_flight[op] += 1
        self.peak_in_flight[op] = max(self.peak_in_flight[op], self.in_flight[op])
        self.requests += 1

    def done(self, op: str, t0: float, status: int | str, nbytes: int = 0) -> None:
        self.in_flight[op] -= 1
        self.latency[op].append(time.perf_counter() - t0)
        self.status[op][status] += 1
        if isinstance(status, int) and status < 400:
            self.bytes[op] += nbytes


async def run_load(url: str, job_ids: list[str], args, headers: dict[str, str]) -> tuple[Stats, float, int]:
    import httpx

    stats = Stats()
    upload_budget = [int(args.max_upload_gib * 1024 * MiB)]
    lo, hi = args.upload_range
    template = np.random.default_rng(1).integers(0, 256, size=int(hi * MiB), dtype=np.uint8).tobytes()
    timeout = httpx.Timeout(args.timeout)

    def go_on() -> bool:
        return time.monotonic() < stop_at and stats.requests < args.max_requests

    async def poller(client: httpx.AsyncClient, k: int) -> None:
        i = k  # stagger which request of the cycle each poller starts with
        while go_on():
            if args.list_every and i % args.list_every == args.list_every - 1:
                op, path, params = "GET /v1/jobs", "/v1/jobs", {"limit": 20}
            else:
                op, path, params = "GET /v1/jobs/{id}", f"/v1/jobs/{job_ids[i % len(job_ids)]}", None
            i += 1
            stats.start(op)
            t0 = time.perf_counter()
            try:
                r = await client.get(path, params=params)
                stats.done(op, t0, r.status_code, len(r.content))
            except httpx.HTTPError as exc:
                stats.done(op, t0, type(exc).__name__)

    async def uploader(client: httpx.AsyncClient, k: int) -> None:
        rng = np.random.default_rng(1000 + k)
        n = 0
        while go_on():
            size = int(rng.uniform(lo, hi) * MiB)
            if upload_budget[0] < size:
                return
            upload_budget[0] -= size
            # distinct bytes every time, so no upload is deduplicated into an earlier one
            prefix = f"{k:04d}:{n:08d}:{uuid.uuid4().hex}".encode()
            body = prefix + template[:size - len(prefix)]
            n += 1
            op = "POST /v1/uploads"
            stats.start(op)
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/uploads", params={"kind": "dataset", "filename": "load.bin"},
                                      content=body, headers={"content-type": "application/octet-stream"})
                stats.done(op, t0, r.status_code, len(body))
            except httpx.HTTPError as exc:
                stats.done(op, t0, type(exc).__name__)

    peak_conns = [0]

    async def count_connections() -> None:
        """Peak ESTABLISHED TCP connections from this process to the API port: are the clients really
        concurrent, or queued in a connection pool?"""
        import psutil

        port = urlparse(url).port or 80
        me = psutil.Process()
        while time.monotonic() < stop_at + 1:
            try:
                n = sum(1 for c in me.net_connections(kind="tcp")
                        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)
                peak_conns[0] = max(peak_conns[0], n)
            except psutil.Error:
                pass
            await asyncio.sleep(1)

    # One AsyncClient (one keep-alive connection) per simulated client: 250 clients are 250 connections.
    # (One shared pool of 250 costs the client far more CPU per request: httpcore scans its whole pool
    # on every request, and on this 2-core machine the client then limits the measurement.)
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # shared: building one per client costs ~10 ms of CPU each
    clients = [httpx.AsyncClient(base_url=url, limits=one, timeout=timeout, verify=tls, headers=headers)
               for _ in range(args.pollers + args.uploaders)]
    stop_at = time.monotonic() + args.duration
    try:
        counter = asyncio.create_task(count_connections())
        t0 = time.perf_counter()
        await asyncio.gather(*[poller(clients[k], k) for k in range(args.pollers)],
                             *[uploader(clients[args.pollers + k], k) for k in range(args.uploaders)])
        elapsed = time.perf_counter() - t0
        counter.cancel()
    finally:
        await asyncio.gather(*[c.aclose() for c in clients])
    return stats, elapsed, peak_conns[0]


# --- report ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


class CpuSampler:
    """CPU seconds used by groups of processes while the load runs. Samples every 0.5 s, so processes
    that start during the load (PostgreSQL backends for new pool connections) are counted too."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]):
        import threading

        self.groups = groups
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._sample()  # processes alive now start from their current count
        self.first = dict(self.last)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        for name, pids in self.groups.items():
            for pid in pids():
                try:
                    t = psutil.Process(pid).cpu_times()
                    self.last[(name, pid)] = t.user + t.system
                except psutil.Error:
                    pass

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def seconds(self) -> dict[str, float]:
        out = {name: 0.0 for name in self.groups}
        for (name, pid), t in self.last.items():
            out[name] += t - self.first.get((name, pid), 0.0)
        return out


class DbConnectionSampler:
    """Peak sessions on the test database (pg_stat_activity, every 0.5 s): does the API's SQLAlchemy
    pool (app/db/session.py: pool_size + max_overflow per process) run full?"""

    def __init__(self, db_name: str):
        import threading

        self.db_name, self.peak = db_name, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        from tests.services import PG_ADMIN_URL

        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            while not self._stop.wait(0.5):
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                 (self.db_name,)).fetchone()[0]
                self.peak = max(self.peak, n)

    def __enter__(self) -> "DbConnectionSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def postgres_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")]


def postgres_pids_of(db_name: str) -> list[int]:
    """The PostgreSQL backends connected to one database, and the server's WAL writer, checkpointer and
    background writer (shared, but they write this database's pages and WAL too): on a server other
    people use at the same time, what postgres_pids counts includes their work."""
    import psycopg

    from tests.services import PG_ADMIN_URL

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        return [r[0] for r in c.execute(
            "select pid from pg_stat_activity where datname = %s or backend_type in "
            "('walwriter', 'checkpointer', 'background writer')", (db_name,))]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000 if values else float("nan")


def report(stats: Stats, elapsed: float, args, cpu: dict[str, float], peak_conns: int, url: str,
           load_before: float) -> str:
    lines = [
        f"{args.pollers} pollers + {args.uploaders} uploaders ({args.upload_mib} MiB), {elapsed:.1f} s, "
        f"API {'x' + str(args.api_workers) + ' uvicorn workers' if args.api_workers > 1 else 'single uvicorn process'}"
        f"{'' if args.url is None else ' at ' + url}; {os.cpu_count()} CPUs ({cpu_model()}). "
        f"Peak TCP connections to the API: {peak_conns}. Load average before: {load_before:.1f}.",
        "",
        "| operation | requests | ok | errors (by status) | p50 ms | p95 ms | p99 ms | max ms | req/s | MiB/s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in ("GET /v1/jobs/{id}", "GET /v1/jobs", "POST /v1/uploads"):
        lat = stats.latency.get(op, [])
        if not lat:
            continue
        ok = sum(n for s, n in stats.status[op].items() if isinstance(s, int) and s < 400)
        errors = ", ".join(f"{s}: {n}" for s, n in sorted(stats.status[op].items(), key=str)
                           if not (isinstance(s, int) and s < 400)) or "none"
        mib_s = stats.bytes[op] / MiB / elapsed if op.startswith("POST") else None
        lines.append(f"| `{op}` | {len(lat)} | {ok} | {errors} | {percentile(lat, 50):.0f} | {percentile(lat, 95):.0f} "
                     f"| {percentile(lat, 99):.0f} | {max(lat) * 1000:.0f} | {len(lat) / elapsed:.1f} | "
                     f"{'' if mib_s is None else f'{mib_s:.1f}'} |")
    if cpu:
        lines += ["", "CPU seconds during the load (of " + f"{elapsed * (os.cpu_count() or 1):.0f} available): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()) + "."]
    return "\n".join(lines)


def parse_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    lo_f, hi_f = float(lo), float(hi or lo)
    if not 0 < lo_f <= hi_f <= 64:
        raise argparse.ArgumentTypeError("--upload-mib: MIN[-MAX] with 0 < MIN <= MAX <= 64")
    return lo_f, hi_f


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running API (loopback only); default: start one on a fresh database")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (at most 600)")
    p.add_argument("--pollers", type=int, default=200)
    p.add_argument("--uploaders", type=int, default=50)
    p.add_argument("--upload-mib", default="1-4", help="upload size in MiB: N or MIN-MAX (uniform)")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes (started API only)")
    p.add_argument("--jobs", type=int, default=4, help="source jobs to create and poll")
    p.add_argument("--list-every", type=int, default=4, help="every Nth poll is GET /v1/jobs (0: never)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="stop after this many requests")
    p.add_argument("--max-upload-gib", type=float, default=4.0, help="stop uploading after this many GiB")
    p.add_argument("--job-wait", type=float, default=180.0, help="seconds to wait for the jobs to finish")
    p.add_argument("--api-key", default=os.environ.get("ADAPTD_API_KEY"),
                   help="for a --url server with ADAPTD_AUTH=keys (default: $ADAPTD_API_KEY)")
    args = p.parse_args(argv)
    args.upload_range = parse_range(args.upload_mib)
    if not 0 < args.duration <= 600:
        p.error("--duration must lie in (0, 600]")
    if args.pollers < 0 or args.uploaders < 0 or args.pollers + args.uploaders == 0:
        p.error("need some clients")

    if args.url:
        require_loopback(args.url)
    stack, ok = None, False
    log_dir = None if args.url else Path(tempfile.mkdtemp(prefix="adaptd-load-"))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            stack = LocalStack(args.api_workers, log_dir)
            url = stack.start()
            print(f"started API at {url}", file=sys.stderr)
        job_ids = create_jobs(url, max(args.jobs, 1), args.job_wait, headers)

        groups: dict[str, Callable[[], list[int]]] = {"load client": lambda: [os.getpid()]}
        if stack is not None:
            groups |= {"API": lambda: stack.pids()["api"], "worker": lambda: stack.pids()["worker"],
                       "PostgreSQL (all databases)": postgres_pids}
        load_before = os.getloadavg()[0]
        db = DbConnectionSampler(stack.db_name) if stack is not None else contextlib.nullcontext()
        with CpuSampler(groups) as cpu, db:
            stats, elapsed, peak_conns = asyncio.run(run_load(url, job_ids, args, headers))
        print(report(stats, elapsed, args, cpu.seconds(), peak_conns, url, load_before))
        if stack is not None:
            print(f"Peak PostgreSQL sessions on the test database: {db.peak} (the API's SQLAlchemy pool, "
                  "pool_size + max_overflow per process in app/db/session.py, plus the worker's).")
            errors = [line for line in (log_dir / "api.log").read_text(errors="replace").splitlines()
                      if "Error" in line or "error" in line]
            if errors:
                print(f"\nAPI log: {len(errors)} error lines, e.g. {errors[0][:200]}", file=sys.stderr)
        ok = True
    finally:
        if stack is not None:
            stack.stop()
            if ok:
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                print(f"load: failed; service logs kept in {log_dir}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
