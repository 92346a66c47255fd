"""Rows 3 and 4: bounded work per byte. A 9000×9000 grey PNG (80 KB zipped) is refused by the per-image
pixel limit (ADAPTD_MAX_IMAGE_PIXELS, 16.7 M by default) and an npz holding 1 GiB of zeros deflated to
~1 MB by the archive limits, each from headers alone: the job fails within seconds with a precise code
and the worker's memory does not grow with them (the pool process's peak RSS rises by < 100 MiB; its total,
torch 2.14 + torchvision's ~830 MB import included, stays under 1.5 GB);
`preprocess.size` is capped (ADAPTD_MAX_PREPROCESS_SIZE)."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import psutil
from datetime import datetime

from tests.security.conftest import spec, start, tenant, upload, wait_job
from tests.services import drop_pg_database

GB = 1000**3


def _png_bomb() -> bytes:
    from PIL import Image

    png = io.BytesIO()
    Image.new("L", (9000, 9000), 128).save(png, format="PNG")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("0/huge.png", png.getvalue())
    return out.getvalue()


def _npz_bomb(tmp_path) -> bytes:
    path = tmp_path / "bomb.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1024, 1024, 1024)})
    zeros = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for _ in range(64):  # 64 × 16 MiB = 1 GiB
                f.write(zeros)
    return path.read_bytes()


def _pool_peak_rss(service) -> tuple[int, int]:
    """(pid, peak resident bytes) of the worker's pool process (the one that runs jobs)."""
    parent = psutil.Process(service.workers[0].pid)
    # Celery's prefork children share the parent's command line (other children, e.g. the worker's
    # capability probe, do not)
    pool = [p for p in parent.children() if p.cmdline() == parent.cmdline()]
    assert len(pool) == 1, [p.cmdline() for p in parent.children()]
    pid = pool[0].pid
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return pid, int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _seconds(job) -> float:
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def test_image_and_npz_bombs_are_refused_in_seconds_in_little_memory(tmp_path, assets):
    service, name = start(tmp_path, "postgres")
    try:
        with tenant(service) as c:
            model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
            data = upload(c, assets["target"].read_bytes())
            warm = c.post("/v1/jobs", json={**spec(model["id"], data["id"], assets), "method": "source"}).json()
            assert wait_job(c, warm["id"])["status"] == "succeeded"  # the pool process has imported torch
            pid, before = _pool_peak_rss(service)

            r = c.post("/v1/jobs", json=spec(model["id"], data["id"], assets,
                                             preprocess={**assets["preprocess"], "size": 4096}))
            assert r.status_code == 422 and "ADAPTD_MAX_PREPROCESS_SIZE" in r.json()["error"]["message"]

            outcomes = {}
            for kind, blob, filename in (("png", _png_bomb(), "bomb.zip"), ("npz", _npz_bomb(tmp_path), "bomb.npz")):
                assert len(blob) < 2 * 1024**2
                bomb = upload(c, blob, "dataset", filename)
                r = c.post("/v1/jobs", json=spec(model["id"], bomb["id"], assets))
                assert r.status_code == 202, r.text
                outcomes[kind] = wait_job(c, r.json()["id"], timeout=120)
            assert outcomes["png"]["status"] == "failed" and outcomes["png"]["error"]["code"] == "image_too_large"
            assert outcomes["npz"]["status"] == "failed"
            assert outcomes["npz"]["error"]["code"] in ("archive_compression_ratio", "archive_too_large")
            for kind, job in outcomes.items():
                assert _seconds(job) < 30, (kind, _seconds(job))
            pid_after, after = _pool_peak_rss(service)
            assert pid_after == pid  # the same pool process ran the bombs
            print(f"\nworker pool process peak RSS: {before / 2**20:.0f} MiB after a warm-up job, "
                  f"{after / 2**20:.0f} MiB after both bombs (increase {(after - before) / 2**20:.0f} MiB); "
                  f"job times: png {_seconds(outcomes['png']):.1f} s, npz {_seconds(outcomes['npz']):.1f} s")
            # What the bombs cost: next to nothing (they are refused from headers and counts). The total is
            # the worker's own: torch 2.14 + torchvision (~830 MB at import) and the engine it preloads.
            assert after - before < 100 * 2**20
            assert after < 1.5 * GB
    finally:
        service.stop()
        drop_pg_database(name)
