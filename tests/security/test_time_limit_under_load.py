"""Item 12: the job time limit reads `time_limit` wherever it lands (fetching inputs from the database,
reading an npz, decoding an archive in DataLoader worker processes, adapting), with the CPU kept busy
by other processes, and the worker runs the next job. (On a loaded 2-core machine the limit used to
surface once as `internal`: it had been wrapped by the code it interrupted.)"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile

import numpy as np

from tests.security.conftest import spec, start, tenant, upload, wait_job
from tests.services import drop_pg_database

BUSY_S = 300  # the busy loops end by themselves even if this test is killed


def _busy_loops(n: int) -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {BUSY_S}\nwhile time.monotonic() < end: pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def _npz(n: int, size: int, seed: int) -> bytes:
    out = io.BytesIO()
    np.savez(out, x=np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8))
    return out.getvalue()


def _png_zip(n: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(png, format="PNG")
            zf.writestr(f"{i % 10}/{i}.png", png.getvalue())
    return out.getvalue()


def test_time_limit_is_classified_wherever_it_lands_under_load(tmp_path, assets):
    service, name = start(tmp_path, "postgres", ADAPTD_JOB_TIME_LIMIT_S="3")
    busy = _busy_loops(os.cpu_count() or 2)
    try:
        with tenant(service) as c:
            model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
            inputs = {
                "adapting": (upload(c, _npz(6000, 16, 0))["id"], {"options": {"batch_size": 2}}),
                "fetch_and_read": (upload(c, _npz(24000, 64, 1))["id"], {"options": {"batch_size": 2}}),
                "archive_decoding": (upload(c, _png_zip(6000), filename="digits.zip")["id"],
                                     {"options": {"batch_size": 2}}),
            }
            for phase, (data_id, extra) in inputs.items():
                r = c.post("/v1/jobs", json={**spec(model["id"], data_id, assets), **extra})
                assert r.status_code == 202, r.text
                job = wait_job(c, r.json()["id"], timeout=240)
                assert job["status"] == "failed" and job["error"]["code"] == "time_limit", (phase, job["error"],
                                                                                             service.logs()[-3000:])
            small = upload(c, assets["target"].read_bytes())["id"]
            ok = wait_job(c, c.post("/v1/jobs", json={**spec(model["id"], small, assets), "method": "source"})
                          .json()["id"], timeout=240)
            assert ok["status"] == "succeeded", ok["error"]
            assert len(service.workers) == 1 and service.workers[0].poll() is None
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=10)
        service.stop()
        drop_pg_database(name)
