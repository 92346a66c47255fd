"""Row 11: what a tenant sees of an error is a code, a message and a correlation id; tracebacks, SQL and
server paths stay in the worker's log, under that id."""
from __future__ import annotations

import numpy as np

from tests.security.conftest import tenant, upload, wait_job


def _npz(tmp_path, name: str, size: int, labels: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, size=(8, size, size), dtype=np.uint8)}
    if labels:
        arrays["y"] = np.zeros(8, dtype=np.int64)
    np.savez(tmp_path / name, **arrays)
    return (tmp_path / name).read_bytes()


def test_failed_job_shows_code_message_and_correlation_id_only(sec_postgres, tmp_path):
    import torch

    from tests.security.boom import exploding
    from worker.adaptation.models.export import save_safetensors

    torch.manual_seed(0)
    save_safetensors(exploding(10), tmp_path / "boom.safetensors")
    with tenant(sec_postgres) as c:
        model = upload(c, (tmp_path / "boom.safetensors").read_bytes(), "model", "boom.safetensors")
        data = upload(c, _npz(tmp_path, "x.npz", 16))
        # the model's forward raises a KeyError: an unclassified error inside the engine (`internal`)
        r = c.post("/v1/jobs", json={
            "method": "source", "model": {"upload_id": model["id"], "architecture": "tests.security.boom:exploding",
                                          "num_classes": 10},
            "data": {"upload_id": data["id"]},
            "preprocess": {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}, "options": {"batch_size": 8}})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"])
        assert job["status"] == "failed"
        error = job["error"]
        assert error["code"] and error["message"] and error["correlation_id"]
        shown = str(error)
        for leak in ("Traceback", "traceback", 'File "', "/work/", "site-packages", ".py", "SELECT", "INSERT"):
            assert leak not in shown, (leak, shown)
        log = "\n".join(p.read_text(errors="replace") for p in sec_postgres.log_dir.glob("worker*.log"))
        lines = [line for line in log.splitlines() if f"correlation_id={error['correlation_id']}" in line]
        assert lines, ("the worker's log has no line under the correlation id", error)
        assert error["code"] == "internal", error
        after = log.split(lines[0], 1)[1]
        assert "Traceback (most recent call last)" in after.split("correlation_id=", 1)[0]

        r = c.get("/v1/jobs/does-not-exist")  # API errors carry one too
        assert r.status_code == 404 and len(r.json()["error"]["correlation_id"]) == 32
