"""The API's read path as ratios measured in one run: how close `GET /v1/jobs/{id}` comes to `GET /healthz`
(a route that touches nothing) under the same concurrency, and what open event streams cost the pollers.

For each backend (PostgreSQL + Redis as `adaptd api` + `adaptd worker`; SQLite as `adaptd up`) it starts
the service on a fresh database, runs a few small `source` jobs to completion (the worker is idle after
that), inserts a few queued jobs that no worker will take (the streams' subjects), then repeats --rounds
times, interleaved so that background load drifts over all phases alike:

    healthz        --pollers clients GET /healthz back to back
    job            --pollers clients GET /v1/jobs/{id} back to back (finished jobs, with artifacts)
    job+streams    the same, while --streams clients hold GET /v1/jobs/{id}/events open on queued jobs
    job            again (the streams' cost is measured against the mean of the two job phases)
    list           --pollers clients GET /v1/jobs?limit=20 back to back
    job paced      --pollers clients GET /v1/jobs/{id}, each once per --every seconds (latency at a
                   fixed offered load; back-to-back clients measure throughput, and their latency is
                   concurrency / throughput by Little's law, whatever the route)

The clients speak HTTP/1.1 over raw asyncio streams (one keep-alive connection each, a few µs of client
CPU per request), so the 2-core machine's CPU goes to the server, not to the load generator. Prints, per
backend, a table per round and the ratios: job/healthz, (job+streams)/job, and p99s. Loopback only and
bounded: every phase lasts --duration seconds.

    python benchmarks/api_ratio.py [--backend postgres,sqlite] [--pollers 200] [--streams 200]
        [--duration 10] [--rounds 2] [--every 1] [--profile DIR] [--auth open|keys]

--profile DIR runs `py-spy record` (if installed) on the API processes during the first `job` phase
and writes DIR/<backend>-job.txt (collapsed stacks) and prints the top frames (self and inclusive).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from load import CpuSampler, cpu_model, create_jobs, postgres_pids  # noqa: E402


# --- a minimal HTTP/1.1 client ---------------------------------------------------------------------

class Conn:
    """One keep-alive connection; GET only; Content-Length bodies (what the API answers to GETs)."""

    def __init__(self, host: str, port: int, auth: str = ""):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {auth}\r\n" if auth else ""
        self.reader = self.writer = None

    async def get(self, path: str) -> tuple[int, int]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status, length

    async def stream(self, path: str, opened: asyncio.Event, counts: Counter) -> None:
        """Hold an event stream open, reading (and discarding) what it sends."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.auth}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        counts[int(head[9:12])] += 1
        opened.set()
        while await self.reader.read(65536):
            counts["bytes"] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def phase(host: str, port: int, paths: list[str], pollers: int, duration: float, every_s: float = 0.0,
                auth: str = "") -> dict:
    """`pollers` clients GET `paths` in turn for `duration` s: back to back, or each at most once per
    `every_s` (a paced client, as the CLI and the dashboard poll)."""
    latencies: list[float] = []
    status: Counter = Counter()
    stop_at = time.monotonic() + duration

    async def poller(k: int) -> None:
        conn, i = Conn(host, port, auth), k
        if every_s:  # spread the paced clients over the interval instead of a burst each second
            await asyncio.sleep(every_s * k / pollers)
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    code, _ = await conn.get(paths[i % len(paths)])
                except (OSError, asyncio.IncompleteReadError):
                    code = "conn_error"
                    conn.close()
                latencies.append(time.perf_counter() - t0)
                status[code] += 1
                i += 1
                if every_s:
                    await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - t0)))
        finally:
            conn.close()

    lags: list[float] = []

    async def lag_probe() -> None:
        """How late this process's event loop wakes a 5 ms sleep: the delay the load generator itself
        adds to a response that has already arrived (it shares the machine's cores with the server)."""
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t - 0.005)

    t0 = time.perf_counter()
    await asyncio.gather(lag_probe(), *(poller(k) for k in range(pollers)))
    elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    ok = sum(n for s, n in status.items() if s == 200)
    return {"n": len(latencies), "ok": ok, "errors": {s: n for s, n in status.items() if s != 200},
            "rate": ok / elapsed, "elapsed": elapsed,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "lag_p50": float(np.percentile(lags, 50)) * 1000 if lags else float("nan"),
            "lag_p99": float(np.percentile(lags, 99)) * 1000 if lags else float("nan")}


async def open_streams(host: str, port: int, paths: list[str], n: int, counts: Counter, auth: str = "") -> list:
    conns = [Conn(host, port, auth) for _ in range(n)]
    events = [asyncio.Event() for _ in range(n)]
    tasks = [asyncio.create_task(c.stream(paths[k % len(paths)], events[k], counts)) for k, c in enumerate(conns)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
    return [conns, tasks]


def close_streams(held) -> None:
    conns, tasks = held
    for t in tasks:
        t.cancel()
    for c in conns:
        c.close()


# --- services --------------------------------------------------------------------------------------

ADMIN_KEY = "adk_benchmark-admin-key"


def tenant_key(url: str) -> str:
    """A new tenant's API key (keys mode), made with the admin key."""
    import httpx

    r = httpx.post(f"{url}/v1/admin/keys", json={"tenant": "bench"}, timeout=30,
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    r.raise_for_status()
    return r.json()["key"]


def queued_jobs(db_url: str, n: int, like: str) -> list[str]:
    """Jobs left queued (never enqueued, so no worker takes them): subjects for event streams."""
    from app.db import repo
    from app.db.models import Job
    from app.db.session import session_scope

    ids = [str(uuid.uuid4()) for _ in range(n)]
    with session_scope(db_url) as s:
        model = repo.get_job(s, like)
        for job_id in ids:
            s.add(Job(id=job_id, tenant_id=model.tenant_id, status="queued", method=model.method,
                      params=model.params, spec=model.spec))
    return ids


class Stack:
    def __init__(self, backend: str, work: Path, auth: str = "open", api_workers: int | None = None,
                 blob_dir: Path | str | None = None):
        from tests.services import REDIS_URL, Service, base_env, create_pg_database

        self.backend, self.db_name = backend, None
        env = {"ADAPTD_HOME": str(work / "home"), "ADAPTD_REAPER_QUEUED_AFTER_S": "100000", "ADAPTD_AUTH": auth}
        if blob_dir is not None:
            env["ADAPTD_BLOB_DIR"] = str(blob_dir)
        if api_workers is not None:
            env["ADAPTD_API_WORKERS"] = str(api_workers)
        if auth == "keys":
            env["ADAPTD_ADMIN_KEY"] = ADMIN_KEY
        if backend == "postgres":
            self.db_name, self.db_url = create_pg_database()
            env |= {"ADAPTD_DATABASE_URL": self.db_url, "ADAPTD_BROKER_URL": REDIS_URL,
                    "ADAPTD_QUEUE": f"adaptd-ratio-{uuid.uuid4().hex[:8]}"}
        else:
            self.db_url = f"sqlite:///{work / 'home' / 'adaptd.db'}"
        self.service = Service(env=base_env(**env), log_dir=work)

    def start(self) -> str:
        if self.backend == "postgres":
            self.service.migrate()
            self.service.start_api()
            self.service.start_worker()
        else:
            self.service.start_embedded()
        return self.service.url

    def pids(self, role: str) -> list[int]:
        """The API processes (uvicorn and its workers) or the Celery worker processes."""
        import psutil

        out = []
        procs = [self.service.api] if role == "api" else self.service.workers
        for proc in procs:
            if proc is None or proc.poll() is not None:
                continue
            try:
                p = psutil.Process(proc.pid)
                tree = [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for q in tree:
                try:
                    # a Celery worker: `adaptd worker`, `celery ...`, or started as `python -c "from
                    # worker.__main__ import main; ..."` (app/spawn.py; embedded mode's children)
                    celery = any("celery" in a or "worker.__main__" in a or a == "worker" for a in q.cmdline())
                except psutil.Error:
                    continue
                if (role == "worker") == celery:
                    out.append(q.pid)
        return out

    def stop(self) -> None:
        from tests.services import drop_pg_database

        self.service.stop()
        if self.db_name:
            drop_pg_database(self.db_name)


def pyspy(pids: list[int], seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists() or not pids:
        return None
    # One recording per process would need several py-spy processes; the main API process (or the
    # first uvicorn worker) is representative: they serve the same code.
    return subprocess.Popen([exe, "record", "-p", str(pids[-1]), "-d", str(int(seconds)), "-r", "50", "-f", "raw", "--gil",
                             "-o", str(out), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(collapsed: Path, n: int = 15) -> str:
    """Top frames of a py-spy collapsed-stack file: self samples and inclusive samples, % of all."""
    self_c, incl, total = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    if not total:
        return "(no samples)"
    # The chain from the interpreter's entry to the event loop is in (nearly) every sample: not informative.
    roots = max(incl.values())
    incl = Counter({f: c for f, c in incl.items() if c < 0.98 * roots})
    rows = ["| self % | frame | | inclusive % | frame |", "|---:|---|---|---:|---|"]
    for (fs, cs), (fi, ci) in zip(self_c.most_common(n), incl.most_common(n)):
        rows.append(f"| {100 * cs / total:.1f} | `{fs}` | | {100 * ci / total:.1f} | `{fi}` |")
    return "\n".join(rows) + f"\n\n({total} samples)"


# --- one backend -----------------------------------------------------------------------------------

# `job` runs before and after `job+streams` (the second spelled with a trailing space here): the streams'
# cost is measured against the mean of both, so drifting background load does not bias it.
PHASES = ("healthz", "job", "job+streams", "job ", "list", "job paced")


def run_backend(backend: str, args) -> list[dict]:
    """One stack per --api-workers count, all started before the first phase; every round runs all
    phases on each stack in turn, so the counts are compared under the same background load."""
    works, stacks, ok = [], {}, False
    try:
        setups = {}
        for n in args.api_workers:
            work = Path(tempfile.mkdtemp(prefix=f"adaptd-ratio-{backend}-{n}-"))
            works.append(work)
            stack = stacks[n] = Stack(backend, work, args.auth, n)
            url = stack.start()
            key = tenant_key(url) if args.auth == "keys" else ""
            done = create_jobs(url, 4, 180.0, {"Authorization": f"Bearer {key}"} if key else {})
            queued = queued_jobs(stack.db_url, 4, done[0])
            setups[n] = (int(url.rsplit(":", 1)[1]), key, [f"/v1/jobs/{j}" for j in done],
                         [f"/v1/jobs/{j}/events" for j in queued])
        rows = []
        host = "127.0.0.1"

        async def rounds() -> None:
            for r in range(args.rounds):
                for n, stack in stacks.items():
                    port, key, job_paths, stream_paths = setups[n]
                    groups = {"API": lambda: stack.pids("api"), "worker": lambda: stack.pids("worker"),
                              "client": lambda: [os.getpid()]}
                    if backend == "postgres":
                        groups["PostgreSQL"] = postgres_pids
                    for name in PHASES:
                        held, counts = None, Counter()
                        if name == "job+streams":
                            held = await open_streams(host, port, stream_paths, args.streams, counts, key)
                        paths = {"healthz": ["/healthz"], "list": ["/v1/jobs?limit=20"]}.get(name, job_paths)
                        name = name.strip()
                        spy = None
                        if args.profile and r == 0 and name in ("job", "job+streams", "list"):
                            spy = pyspy(stack.pids("api"), args.duration,
                                        args.profile / f"{backend}-w{n}-{name.replace('+', '-')}.txt")
                        with CpuSampler(groups) as cpu:
                            res = await phase(host, port, paths, args.pollers, args.duration,
                                              args.every if name == "job paced" else 0.0, key)
                        if held is not None:
                            res["streams_ok"] = counts.get(200, 0)
                            close_streams(held)
                        if spy is not None:
                            spy.wait(timeout=args.duration + 30)
                        res |= {"round": r + 1, "workers": n, "phase": name, "cpu": cpu.seconds(),
                                "load": os.getloadavg()[0]}
                        rows.append(res)
                        print(f"{backend} x{n} round {r + 1} {name}: {res['rate']:.0f} req/s p99 {res['p99']:.0f} "
                              f"ms errors {res['errors']}", file=sys.stderr)
                        await asyncio.sleep(1)

        asyncio.run(rounds())
        ok = True
        return rows
    finally:
        for stack in stacks.values():
            stack.stop()
        for work in works:
            if ok:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"api_ratio: failed; logs in {work}", file=sys.stderr)


def _job(mine: list[dict]) -> dict:
    """The two `job` phases around `job+streams`: their mean rate and the larger p99."""
    jobs = [r for r in mine if r["phase"] == "job"]
    return {"rate": statistics.mean(r["rate"] for r in jobs), "p99": max(r["p99"] for r in jobs)}


def report(backend: str, rows: list[dict], args) -> str:
    out = [f"### {backend} ({args.auth} access): {args.pollers} pollers, {args.streams} streams, {args.duration:.0f} s per phase, "
           f"{args.rounds} rounds, API processes {'/'.join(map(str, args.api_workers))}", "",
           "| round | API processes | phase | req/s | p50 ms | p99 ms | errors | CPU s: API / client / database / worker "
           "| client loop lag p50 / p99 ms | load |",
           "|---:|---:|---|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        cpu = r["cpu"]
        db = cpu.get("PostgreSQL")
        streams = f" ({r['streams_ok']} streams open)" if "streams_ok" in r else ""
        out.append(f"| {r['round']} | {r['workers']} | {r['phase']}{streams} | {r['rate']:.0f} | {r['p50']:.0f} | "
                   f"{r['p99']:.0f} | {r['errors'] or 'none'} | {cpu['API']:.1f} / {cpu['client']:.1f} / "
                   f"{'—' if db is None else f'{db:.1f}'} / {cpu['worker']:.1f} | "
                   f"{r['lag_p50']:.1f} / {r['lag_p99']:.1f} | {r['load']:.1f} |")
    out += ["", "job: the mean rate and the larger p99 of the two `job` phases around `job+streams`. "
            "Client CPU %: the load generator's CPU seconds over the phase's duration.", "",
            f"| round | API processes | job / healthz | (job+streams) / job | healthz p99 ms | job p99 ms "
            f"| job+streams p99 ms | list / job | list p99 ms | paced ({args.pollers / args.every:.0f} req/s offered) "
            f"p50 / p99 ms | client CPU % (job) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for k in range(1, args.rounds + 1):
        for n in args.api_workers:
            mine = [r for r in rows if r["round"] == k and r["workers"] == n]
            by = {r["phase"]: r for r in mine}
            h, s, li, pc = by["healthz"], by["job+streams"], by["list"], by["job paced"]
            j = _job(mine)
            client = statistics.mean(r["cpu"]["client"] / r["elapsed"] for r in mine if r["phase"] == "job")
            out.append(f"| {k} | {n} | {j['rate'] / h['rate']:.2f} | {s['rate'] / j['rate']:.2f} | {h['p99']:.0f} | "
                       f"{j['p99']:.0f} | {s['p99']:.0f} | {li['rate'] / j['rate']:.2f} | {li['p99']:.0f} | "
                       f"{pc['p50']:.0f} / {pc['p99']:.0f} | {100 * client:.0f} |")
    if len(args.api_workers) > 1:
        base = args.api_workers[0]
        out += ["", f"Rates against {base} API process(es), same round:", "",
                "| round | API processes | healthz | job | job+streams | list |", "|---:|---:|---:|---:|---:|---:|"]
        for k in range(1, args.rounds + 1):
            ref = {r["phase"]: r for r in rows if r["round"] == k and r["workers"] == base}
            ref_job = _job([r for r in rows if r["round"] == k and r["workers"] == base])
            for n in args.api_workers[1:]:
                mine = [r for r in rows if r["round"] == k and r["workers"] == n]
                by = {r["phase"]: r for r in mine}
                out.append(f"| {k} | {n} | {by['healthz']['rate'] / ref['healthz']['rate']:.2f} | "
                           f"{_job(mine)['rate'] / ref_job['rate']:.2f} | "
                           f"{by['job+streams']['rate'] / ref['job+streams']['rate']:.2f} | "
                           f"{by['list']['rate'] / ref['list']['rate']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="postgres,sqlite")
    p.add_argument("--pollers", type=int, default=200)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--every", type=float, default=1.0, help="seconds between one paced client's polls")
    p.add_argument("--profile", type=Path, default=None)
    p.add_argument("--api-workers", default=None, type=lambda v: [int(x) for x in v.split(",")],
                   help="comma-separated API process counts to compare in one run (ADAPTD_API_WORKERS); "
                        "default: the service's own default")
    p.add_argument("--auth", choices=("open", "keys"), default="open",
                   help="keys: every request carries a tenant's API key (ADAPTD_AUTH=keys)")
    args = p.parse_args(argv)
    if not (0 < args.duration <= 120 and 1 <= args.rounds <= 5 and 1 <= args.pollers <= 1000
            and 0 <= args.streams <= 1000):
        p.error("duration in (0, 120], rounds 1-5, pollers 1-1000, streams 0-1000")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.api_workers is None:
        from app.config import Settings

        args.api_workers = [Settings().api_workers]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs ({cpu_model()}); load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    for backend in args.backend.split(","):
        rows = run_backend(backend, args)
        print()
        print(report(backend, rows, args))
        if args.profile:
            for n in args.api_workers:
                for name in ("job", "job-streams", "list"):
                    f = args.profile / f"{backend}-w{n}-{name}.txt"
                    if f.exists():
                        print(f"\nTop frames, {backend}, {n} API process(es), `{name}` phase, one API process "
                              "(py-spy --gil, 50 Hz: where its CPU goes):\n")
                        print(top_frames(f))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
