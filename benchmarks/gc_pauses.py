"""What Python's garbage collector costs the API under 200 back-to-back pollers: the API (embedded
SQLite, open access) runs in a child process that records every collection's duration, with and without
app.main's start-up `gc.freeze()`, while this process polls `GET /v1/jobs?limit=20` (benchmarks/api_ratio.py's
client). Prints, per variant, the request rate and p50/p99, and per generation the collections, their
total and their longest pause.

    python benchmarks/gc_pauses.py [--duration 8] [--pollers 200] [--path /v1/jobs?limit=20]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from api_ratio import phase  # noqa: E402
from load import cpu_model  # noqa: E402
from tests.services import base_env, free_port  # noqa: E402

SERVER = """
import gc, json, sys, threading, time
pauses, start = [], [0.0]
def cb(phase, info):
    if phase == "start":
        start[0] = time.perf_counter()
    else:
        pauses.append((info["generation"], time.perf_counter() - start[0]))
if sys.argv[2] == "off":
    gc.freeze = lambda: None  # app.main's lifespan calls it
import uvicorn
from app.config import get_settings
from app.db.migrate import upgrade_head
settings = get_settings()
settings.home.mkdir(parents=True, exist_ok=True)
upgrade_head(settings.resolved_database_url)
def dump():
    sys.stdin.readline()  # the parent's load starts: start-up's collections are not counted
    pauses.clear()
    sys.stdin.readline()  # the parent's load is over
    print(json.dumps(pauses), flush=True)
    import os; os._exit(0)
threading.Thread(target=dump, daemon=True).start()
gc.callbacks.append(cb)
uvicorn.run("app.main:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def run(variant: str, args) -> str:
    import httpx

    port = free_port()
    env = base_env(ADAPTD_HOME=tempfile.mkdtemp(prefix="adaptd-gc-"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), variant], env=env, cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        proc.stdin.write("\n")
        proc.stdin.flush()
        res = asyncio.run(phase("127.0.0.1", port, [args.path], args.pollers, args.duration))
        proc.stdin.write("\n")
        proc.stdin.flush()
        import json

        pauses = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    rows = []
    for g in (0, 1, 2):
        mine = sorted(p for gen, p in pauses if gen == g)
        if mine:
            rows.append(f"gen{g}: {len(mine)} / {1000 * sum(mine):.0f} ms / {1000 * mine[-1]:.0f} ms")
    return (f"| {variant} | {res['rate']:.0f} | {res['p50']:.0f} / {res['p99']:.0f} | {'; '.join(rows)} | "
            f"{os.getloadavg()[0]:.1f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--pollers", type=int, default=200)
    p.add_argument("--path", default="/v1/jobs?limit=20")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs ({cpu_model()}); load average "
          f"{os.getloadavg()[0]:.1f} at the start; {args.pollers} pollers of {args.path}, {args.duration:.0f} s each\n")
    print("| gc.freeze at start-up | req/s | p50 / p99 ms | collections: count / total / longest, per generation "
          "during the load | load |")
    print("|---|---:|---|---|---:|")
    for _ in range(args.rounds):
        for variant in ("off", "on"):
            print(run(variant, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
