"""A small typed Python client for the REST contract (DESIGN §3). The CLI and the demo use it.

    from app.client import Client
    c = Client("http://127.0.0.1:8000")
    model = c.upload("model.safetensors", kind="model")
    data = c.upload("target.npz", kind="dataset")
    job = c.submit({"method": "tent", "model": {"upload_id": model["id"], "architecture": "resnet18",
                    "num_classes": 10}, "data": {"upload_id": data["id"]}})
    job = c.wait(job["id"])
    c.download(job["id"], "model.safetensors", "adapted.safetensors")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: dict | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail or {}


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
            except Exception:  # noqa: BLE001
                err = {"code": f"http_{r.status_code}", "message": r.text[:500]}
            raise ApiError(r.status_code, err.get("code", ""), err.get("message", ""), err.get("detail"))
        return r

    def upload(self, path: str | Path, kind: str, filename: str | None = None,
               on_progress: Callable[[int, int], None] | None = None, chunk: int = 1 << 20) -> dict:
        """Streams the file (never read whole into memory)."""
        path = Path(path)
        total = path.stat().st_size

        def body() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as f:
                while data := f.read(chunk):
                    sent += len(data)
                    if on_progress:
                        on_progress(sent, total)
                    yield data

        r = self.http.post("/v1/uploads", params={"kind": kind, "filename": filename or path.name},
                           content=body(), headers={"Content-Type": "application/octet-stream",
                                                    "Content-Length": str(total)})
        return self._check(r).json()

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=spec, headers=headers)).json()

    def job(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, status: str | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def cancel(self, job_id: str) -> dict:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def methods(self) -> list[dict]:
        return self._check(self.http.get("/v1/methods")).json()["methods"]

    def wait(self, job_id: str, on_update: Callable[[dict], None] | None = None, poll: float = 0.5,
             timeout: float | None = None) -> dict:
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        dest = Path(dest)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            with open(dest, "wb") as f:
                for data in r.iter_bytes():
                    f.write(data)
        return dest

    def artifact_json(self, job_id: str, name: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")).json()
