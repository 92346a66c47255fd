"""GPU check of the whole service path (run on a machine with a CUDA device; not a test).

Starts the embedded service (`adaptd up`: API, SQLite, one worker process), then, on resnet50 at 224 px
with TENT (SGD 2.5e-4):
1. a job whose whole set is one batch (`--oom-batch`, 8192): must fail with `out_of_memory`, and the
   worker must survive it;
2. the same job at batch 64 on the same worker: must succeed on `cuda` with bf16 autocast;
3. a `--images` (50,000) image job at batch 64: its wall time in the service (the job's finished_at −
   created_at: queue, fetching model and data from the database, the run, storing the outputs) against
   the same run's engine time (`runner.run` on the same files, in this process, same spec). Goal: ≤ 1.05×.
Prints one table. Usage: python benchmarks/gpu_service_check.py [--port 8123] [--images 50000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--oom-batch", type=int, default=8192)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    import httpx
    import torch

    from app.client import Client
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.runner import RunRequest, run

    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (smoke run: no CUDA)'}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="adaptd-gpu-"))
    torch.manual_seed(0)
    save_safetensors(build_model(args.arch, 10), work / "model.safetensors")
    rng = np.random.default_rng(0)
    np.savez(work / "small.npz", x=rng.integers(0, 256, size=(args.oom_batch, 32, 32, 3), dtype=np.uint8))
    np.savez(work / "large.npz", x=rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8))

    def spec(batch: int) -> dict:
        return {"method": "tent", "params": {"optimizer": "sgd", "lr": 2.5e-4},
                "model": {"architecture": args.arch, "num_classes": 10},
                "preprocess": {"size": args.size, "channels": 3, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225]},
                "options": {"batch_size": batch, "device": "auto", "precision": "auto"}}

    # The engine alone, in this process, on the large set (a first small run warms CUDA and cuDNN, as the
    # worker's earlier jobs warm it there).
    engine = {}
    for name, path in (("warm", work / "small.npz"), ("large", work / "large.npz")):
        s = spec(64)
        req = RunRequest.for_files(work / "model.safetensors", path, work / f"engine-{name}", **s)
        t0 = time.perf_counter()
        result = run(req)
        engine[name] = (time.perf_counter() - t0, result.metrics)
    print(f"engine run ({args.images} images): {engine['large'][0]:.1f} s, adapt "
          f"{engine['large'][1]['timing']['adapt_seconds']:.1f} s, {engine['large'][1]['images_per_second']:,.0f} img/s",
          flush=True)
    if cuda:
        torch.cuda.empty_cache()

    env = {**os.environ, "ADAPTD_HOME": str(work / "home")}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(args.port), "--log-level",
                               "warning"], cwd=REPO, env=env)
    rows = []
    service_wall = None
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.5)
        with Client(url, timeout=600) as c:
            model = c.upload(work / "model.safetensors", "model")
            small = c.upload(work / "small.npz", "dataset")
            large = c.upload(work / "large.npz", "dataset")
            for label, batch, data in (("oom", args.oom_batch, small), ("next", 64, small),
                                       ("large", 64, large)):
                s = spec(batch)
                s["model"]["upload_id"] = model["id"]
                s["data"] = {"upload_id": data["id"]}
                t0 = time.perf_counter()
                job = c.wait(c.submit(s)["id"], timeout=900, poll=0.2)
                m = job["metrics"] or {}
                wall = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])
                        ).total_seconds() if job.get("finished_at") else None
                if label == "large":
                    service_wall = wall
                rows.append((label, batch, job["status"], (job["error"] or {}).get("code", ""), m.get("device", ""),
                             m.get("precision", ""), m.get("images_per_second", 0.0),
                             m.get("peak_memory_bytes", 0) / 2**30, wall, time.perf_counter() - t0))
                print(f"job {label}: {job['status']} {(job['error'] or {}).get('code', '')} wall {wall}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\n{args.arch}, {args.size} px, tent (SGD 2.5e-4), embedded service (SQLite, one worker)\n")
    print("| job | batch | status | error code | device | precision | images/s (adapt) | peak GiB | "
          "job wall s (created→finished) | client s (submit→seen done) |")
    print("|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for label, b, st, code, dev, prec, ips, mem, wall, client in rows:
        print(f"| {label} | {b} | {st} | {code} | {dev} | {prec} | {ips:,.0f} | {mem:.1f} | "
              f"{wall if wall is None else f'{wall:.1f}'} | {client:.1f} |")
    eng = engine["large"][0]
    ratio = service_wall / eng if service_wall else None
    print(f"\n{args.images}-image job: service wall {service_wall if service_wall is None else f'{service_wall:.1f}'} s, "
          f"engine (runner.run in-process) {eng:.1f} s, ratio {ratio if ratio is None else f'{ratio:.3f}'} "
          f"(goal ≤ 1.05)")
    ok = rows[0][2] == "failed" and rows[0][3] == "out_of_memory" and rows[1][2] == "succeeded" \
        and rows[2][2] == "succeeded"
    print("OOM classified and the worker served the next jobs" if ok else "UNEXPECTED outcome")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
