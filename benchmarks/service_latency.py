"""Upload throughput (MiB/s) and submit-to-running latency, embedded (SQLite + filesystem broker) and
production-shaped (PostgreSQL + Redis), on this machine. Prints one table.

    python benchmarks/service_latency.py [--upload-mib 256] [--jobs 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.client import Client  # noqa: E402
from tests.services import REDIS_URL, Service, base_env, create_pg_database, drop_pg_database  # noqa: E402


def make_assets(work: Path) -> tuple[Path, Path]:
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors

    save_safetensors(build_model("digit_cnn", 10, width=16), work / "m.safetensors")
    np.savez(work / "d.npz", x=np.random.default_rng(0).integers(0, 256, (64, 16, 16), dtype=np.uint8))
    return work / "m.safetensors", work / "d.npz"


def measure(service: Service, work: Path, upload_mib: int, jobs: int) -> dict:
    big = work / "big.bin"
    with open(big, "wb") as f:
        for _ in range(upload_mib):
            f.write(os.urandom(1 << 20))
    model_path, data_path = make_assets(work)
    with Client(service.url, timeout=600) as c:
        t0 = time.perf_counter()
        c.upload(big, "dataset")
        mib_s = upload_mib / (time.perf_counter() - t0)
        model, data = c.upload(model_path, "model"), c.upload(data_path, "dataset")
        spec = {"method": "source", "model": {"upload_id": model["id"], "architecture": "digit_cnn",
                                              "num_classes": 10, "arch_kwargs": {"width": 16}},
                "data": {"upload_id": data["id"]}, "preprocess": {"channels": 1}, "options": {"batch_size": 64}}
        c.wait(c.submit(spec)["id"], timeout=300)  # warm the worker (imports torch once)
        seen, recorded = [], []
        for i in range(jobs):
            spec["options"]["seed"] = i + 1
            t = time.perf_counter()
            job = c.submit(spec)
            while (j := c.job(job["id"]))["status"] == "queued":
                time.sleep(0.01)
            seen.append(time.perf_counter() - t)
            c.wait(job["id"], timeout=300, poll=0.1)
            j = c.job(job["id"])
            from datetime import datetime
            recorded.append((datetime.fromisoformat(j["started_at"]) - datetime.fromisoformat(j["created_at"]))
                            .total_seconds())
    return {"mib_s": mib_s, "seen_p50": statistics.median(seen), "seen_max": max(seen),
            "db_p50": statistics.median(recorded)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upload-mib", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=10)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        embedded = Service(env=base_env(ADAPTD_HOME=str(work / "home"), ADAPTD_HEARTBEAT_INTERVAL_S="2"),
                           log_dir=work)
        embedded.start_embedded()
        try:
            rows.append(("embedded (SQLite + filesystem broker)", measure(embedded, work, args.upload_mib, args.jobs)))
        finally:
            embedded.stop()
        name, url = create_pg_database()
        env = base_env(ADAPTD_DATABASE_URL=url, ADAPTD_BROKER_URL=REDIS_URL, ADAPTD_HOME=str(work / "pg"),
                       ADAPTD_QUEUE=f"bench-{uuid.uuid4().hex[:8]}", ADAPTD_HEARTBEAT_INTERVAL_S="2")
        pg = Service(env=env, log_dir=work)
        pg.migrate()
        pg.start_api()
        pg.start_worker()
        try:
            rows.append(("PostgreSQL + Redis + Celery worker", measure(pg, work, args.upload_mib, args.jobs)))
        finally:
            pg.stop()
            drop_pg_database(name)
    print(f"\n| mode | upload {args.upload_mib} MiB (MiB/s) | submit → running seen by client, p50 / max (ms) "
          f"| created_at → started_at p50 (ms) |")
    print("|---|---:|---:|---:|")
    for mode, r in rows:
        print(f"| {mode} | {r['mib_s']:.1f} | {1000 * r['seen_p50']:.0f} / {1000 * r['seen_max']:.0f} | "
              f"{1000 * r['db_p50']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
