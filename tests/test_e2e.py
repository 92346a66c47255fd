"""The whole user path over HTTP: upload, submit, poll, download, on PostgreSQL + Redis + a Celery
worker process and on the embedded default."""
from __future__ import annotations

import hashlib
import json

import httpx

from tests.helpers import blob_dir, blob_path, eval_accuracy, tent_spec, upload_assets

STABLE_KEYS = {"accuracy_before", "accuracy_after", "entropy_before", "entropy_after",
               "predicted_class_entropy_after", "agreement_with_source", "estimated_accuracy_after",
               "images_per_second", "peak_memory_bytes", "collapse_detected"}


def test_tent_job_end_to_end(client, service, assets, tmp_path):
    uploads = upload_assets(client, assets)
    job = client.submit(tent_spec(uploads, assets))
    assert job["status"] in ("queued", "running")
    seen_running = []
    job = client.wait(job["id"], on_update=lambda j: seen_running.append(j["status"] == "running"),
                      poll=0.2, timeout=300)
    assert job["status"] == "succeeded", (job["error"], service.logs())
    assert job["started_at"] and job["finished_at"] and job["attempts"] == 1
    assert job["progress"]["done"] == job["progress"]["total"] > 0

    m = job["metrics"]
    assert STABLE_KEYS <= set(m)
    assert m["accuracy_after"] > m["accuracy_before"], m
    assert m["collapse_detected"] is False
    assert {a["name"] for a in job["artifacts"]} == {"model.safetensors", "metrics.json", "history.json",
                                                     "examples.json"}

    weights = client.download(job["id"], "model.safetensors", tmp_path / "adapted.safetensors")
    listed = {a["name"]: a for a in job["artifacts"]}["model.safetensors"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == listed["sha256"]
    # The downloaded weights, in eval() mode, reproduce the reported adapted accuracy.
    assert abs(eval_accuracy(weights, assets) - m["accuracy_after"]) <= 0.01

    history = client.artifact_json(job["id"], "history.json")
    assert len(history["steps"]) == job["progress"]["total"]
    assert all("loss" in s and "entropy" in s for s in history["steps"])
    assert client.artifact_json(job["id"], "metrics.json")["accuracy_after"] == m["accuracy_after"]

    # a few eval images with the labels and the predictions before and after, small enough to show
    examples = client.artifact_json(job["id"], "examples.json")
    assert examples["set"] == "eval" and 1 <= len(examples["items"]) <= 8
    assert {a["name"]: a for a in job["artifacts"]}["examples.json"]["size"] < 20_000
    for item in examples["items"]:
        assert item["image"].startswith("data:image/png;base64,")
        assert item["label"] == int(assets["y"][item["index"]])
        assert 0 <= item["before"]["class"] < 10 and 0 < item["after"]["confidence"] <= 1
    assert examples["changed"] > 0 and any(i["before"]["class"] != i["after"]["class"] for i in examples["items"])


def test_artifact_etag_and_range(client, service, assets, tmp_path):
    uploads = upload_assets(client, assets, with_eval=False)
    job = client.wait(client.submit(tent_spec(uploads, assets, method="source"))["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    url = f"{service.url}/v1/jobs/{job['id']}/artifacts/model.safetensors"
    full = httpx.get(url)
    assert full.status_code == 200
    etag = full.headers["etag"]
    assert etag == f'"{hashlib.sha256(full.content).hexdigest()}"'
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304

    stored = blob_path(service, job["id"], "model.safetensors")
    assert (stored is not None) == (blob_dir(service) is not None)  # PostgreSQL service: a file in ADAPTD_BLOB_DIR
    assert stored is None or stored.read_bytes() == full.content

    part = httpx.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(full.content)}"
    tail = httpx.get(url, headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == full.content[-16:]
    bad = httpx.get(url, headers={"Range": f"bytes={len(full.content)}-"})
    assert bad.status_code == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"
    missing = httpx.get(f"{service.url}/v1/jobs/{job['id']}/artifacts/nope.bin")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "artifact_not_found"
    # the source method leaves the weights untouched
    assert json.loads(httpx.get(f"{service.url}/v1/jobs/{job['id']}/artifacts/metrics.json").content)[
        "agreement_with_source"] == 1.0
