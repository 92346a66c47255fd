"""GPU check of the whole service path (run on a machine with a CUDA device; not a test).

Starts the embedded service (`adaptd up`), then:
1. a tent job on resnet50 at 224 px with the whole set as one batch (8192): must fail with `out_of_memory`, and the worker
   must survive it;
2. the same job at batch 64 on the same worker: must succeed on `cuda` with bf16 autocast, and report
   images/s and peak device memory.
Prints one table. Usage: python benchmarks/gpu_service_check.py [--port 8123] [--images 8192]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--images", type=int, default=8192)
    args = ap.parse_args()

    import torch

    from app.client import Client
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors

    assert torch.cuda.is_available(), "this check needs a CUDA device"
    work = Path(tempfile.mkdtemp(prefix="adaptd-gpu-"))
    torch.manual_seed(0)
    save_safetensors(build_model("resnet50", 10), work / "r50.safetensors")
    rng = np.random.default_rng(0)
    np.savez(work / "data.npz", x=rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8))

    env = {**os.environ, "ADAPTD_HOME": str(work / "home")}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(args.port), "--log-level",
                               "warning"], cwd=REPO, env=env)
    rows = []
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        import httpx
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.5)
        with Client(url, timeout=300) as c:
            model = c.upload(work / "r50.safetensors", "model")
            data = c.upload(work / "data.npz", "dataset")

            def spec(batch):
                return {"method": "tent", "params": {"optimizer": "sgd", "lr": 2.5e-4},
                        "model": {"upload_id": model["id"], "architecture": "resnet50", "num_classes": 10},
                        "data": {"upload_id": data["id"]},
                        "preprocess": {"size": 224, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]},
                        "options": {"batch_size": batch, "device": "auto", "precision": "auto"}}

            for batch in (args.images, 64):
                t0 = time.perf_counter()
                job = c.wait(c.submit(spec(batch))["id"], timeout=600)
                m = job["metrics"] or {}
                rows.append((batch, job["status"], (job["error"] or {}).get("code", ""), m.get("device", ""),
                             m.get("precision", ""), m.get("images_per_second", 0.0),
                             m.get("peak_memory_bytes", 0) / 2**30, time.perf_counter() - t0))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"\nGPU: {torch.cuda.get_device_name(0)}; resnet50, 224 px, tent (SGD), {args.images} images\n")
    print("| batch | status | error code | device | precision | images/s (adapt) | peak GiB | job wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for b, st, code, dev, prec, ips, mem, wall in rows:
        print(f"| {b} | {st} | {code} | {dev} | {prec} | {ips:,.0f} | {mem:.1f} | {wall:.1f} |")
    ok = rows[0][1] == "failed" and rows[0][2] == "out_of_memory" and rows[1][1] == "succeeded"
    print("\nOOM handled and worker survived" if ok else "\nUNEXPECTED outcome")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
