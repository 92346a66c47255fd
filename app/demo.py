"""`adaptd demo`: the whole user path on the embedded default, with real numbers.

Trains a small CNN on scikit-learn's bundled digits (the "source" domain), builds a shifted target
set from held-out digits (rescaled, lower contrast, noised: a new scanner), uploads model and data over
HTTP, runs a `tent` job, follows its progress, downloads the adapted weights, checks them locally, and
prints accuracy before and after as computed by the service."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from .client import Client
from .demo_data import ARCH_KWARGS, PREPROCESS, make_demo_split


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the embedded server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no ready server at {url} after {timeout} s")


def _engine(*args: str) -> str:
    """Run the demo's torch side (worker/demo_model.py) in a subprocess: the API package never imports
    the engine. Returns its stdout."""
    return subprocess.run([sys.executable, "-m", "worker.demo_model", *args], check=True,
                          capture_output=True, text=True).stdout


def run_demo(url: str | None = None, port: int = 8000, keep: bool = False) -> int:
    server = None
    if url is None:
        url = f"http://127.0.0.1:{port}"
        print(f"starting the embedded service (adaptd up --port {port}) ...", flush=True)
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port),
                                   "--log-level", "warning"])
    try:
        _wait_ready(url, server)
        with tempfile.TemporaryDirectory(prefix="adaptd-demo-") as tmp:
            return _demo(Client(url), Path(tmp))
    finally:
        if server is not None and not keep:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def _demo(client: Client, workdir: Path) -> int:
    split = make_demo_split(seed=0)
    print(f"source domain: {len(split['x_source'])} sklearn digits (16x16); target: "
          f"{len(split['x_target'])} held-out digits, rescaled, low contrast, noised", flush=True)
    model_path = workdir / "source_model.safetensors"
    _engine("train", str(model_path))
    np.savez(workdir / "target.npz", x=split["x_target"])                      # unlabelled
    np.savez(workdir / "target_eval.npz", x=split["x_target"], y=split["y_target"])

    def bar(name):
        return lambda sent, total: print(f"\r  upload {name}: {sent / total:6.1%}", end="", flush=True)

    uploads = {}
    for name, path, kind in [("model", model_path, "model"), ("data", workdir / "target.npz", "dataset"),
                             ("eval_data", workdir / "target_eval.npz", "dataset")]:
        uploads[name] = client.upload(path, kind, on_progress=bar(path.name))
        print(f"  -> {uploads[name]['id']} ({uploads[name]['size']} bytes)", flush=True)
    spec = {
        "method": "tent", "params": {"lr": 1e-3},
        "model": {"upload_id": uploads["model"]["id"], "architecture": "digit_cnn", "num_classes": 10,
                  "arch_kwargs": ARCH_KWARGS, "format": "safetensors"},
        "data": {"upload_id": uploads["data"]["id"], "format": "npz"},
        "eval_data": {"upload_id": uploads["eval_data"]["id"], "format": "npz"},
        "preprocess": PREPROCESS,
        "options": {"batch_size": 64, "seed": 0, "device": "auto", "precision": "auto"},
    }
    job = client.submit(spec)
    print(f"submitted tent job {job['id']}", flush=True)

    def show(j):
        p = j["progress"]
        print(f"\r  [{j['status']:9s}] {p['phase'] or '':18s} {p['done']}/{p['total']} batches "
              f"({p['fraction']:.0%})", end="", flush=True)

    job = client.wait(job["id"], on_update=show, poll=0.3)
    print()
    if job["status"] != "succeeded":
        print(f"job {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1
    downloaded = client.download(job["id"], "model.safetensors", workdir / "adapted.safetensors")
    m = job["metrics"]
    local = float(_engine("score", str(downloaded), str(workdir / "target_eval.npz")))
    print(f"accuracy before (source model): {m['accuracy_before']:.3f}")
    print(f"accuracy after  (tent, eval mode): {m['accuracy_after']:.3f}   "
          f"(downloaded weights re-scored here: {local:.3f})")
    print(f"label-free: entropy {m['entropy_before']:.3f} -> {m['entropy_after']:.3f}, agreement with source "
          f"{m['agreement_with_source']:.3f}, estimated accuracy {m['estimated_accuracy_after']:.3f}, "
          f"collapse detected: {m['collapse_detected']}, {m['images_per_second']:.0f} images/s")
    improved = m["accuracy_after"] > m["accuracy_before"]
    print("adaptation helped" if improved else "adaptation did NOT help")
    return 0 if improved else 2
