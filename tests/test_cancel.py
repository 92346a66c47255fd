"""Cancel: a queued job is cancelled at once; a running one stops at the next batch."""
from __future__ import annotations

import time

from tests.helpers import random_npz


def test_cancel_queued_and_running(client, service, assets, tmp_path):
    random_npz(tmp_path / "big.npz", n=40_000)
    model = client.upload(assets["model"], "model")
    data = client.upload(tmp_path / "big.npz", "dataset")
    spec = {"method": "tent", "model": {"upload_id": model["id"], "architecture": "digit_cnn", "num_classes": 10,
                                        "arch_kwargs": assets["arch_kwargs"]},
            "data": {"upload_id": data["id"]}, "preprocess": assets["preprocess"],
            "options": {"batch_size": 4}}
    long_job = client.submit(spec)
    deadline = time.monotonic() + 120
    while client.job(long_job["id"])["status"] != "running":
        assert time.monotonic() < deadline, "the long job never started"
        time.sleep(0.2)

    waiting = client.submit(spec)  # the only worker is busy: this one stays queued
    assert client.job(waiting["id"])["status"] == "queued"
    cancelled = client.cancel(waiting["id"])
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert client.cancel(waiting["id"])["status"] == "cancelled"  # idempotent

    running = client.cancel(long_job["id"])
    assert running["cancel_requested"] is True
    t0 = time.monotonic()
    final = client.wait(long_job["id"], poll=0.2, timeout=60)
    assert final["status"] == "cancelled", final
    assert final["error"] is None and final["artifacts"] == []
    print(f"\nrunning job stopped {time.monotonic() - t0:.1f} s after cancel")
    # the cancelled queued job's message is dropped by the worker: it never runs
    time.sleep(1.0)
    assert client.job(waiting["id"])["status"] == "cancelled"
    assert client.job(waiting["id"])["started_at"] is None
