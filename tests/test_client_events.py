"""The Python client round trip with keyword submit (paths uploaded for you), and the live event stream
`GET /v1/jobs/{id}/events` (Server-Sent Events): status, progress, per-step loss/entropy and a final end
event for a real job, on PostgreSQL + Redis and on the embedded default; resumption with Last-Event-ID."""
from __future__ import annotations

import hashlib

import httpx
import pytest

from app.client import ApiError, Client, Event, build_spec, parse_sse
from tests.ux_helpers import spec_kwargs

pytestmark = pytest.mark.slow


def test_parse_sse_framing():
    lines = ["retry: 2000", "", ": keepalive", "", "event: step", "id: 7", 'data: {"a":', "data: 1}", "",
             "data: plain", ""]
    assert list(parse_sse(iter(lines))) == [(None, None, None, 2000), ("step", '{"a":\n1}', "7", None),
                                            ("message", "plain", "7", None)]


def test_build_spec_overlays_a_base_spec():
    base = {"method": "tent", "params": {"lr": 1e-3}, "model": {"upload_id": "m", "architecture": "resnet18",
                                                                "num_classes": 10}, "data": {"upload_id": "d"}}
    spec = build_spec(base, params={"steps": 2}, num_classes=100, data_format="npz", options={"seed": 3})
    assert spec["params"] == {"lr": 1e-3, "steps": 2}
    assert spec["model"] == {"upload_id": "m", "architecture": "resnet18", "num_classes": 100}
    assert spec["data"] == {"upload_id": "d", "format": "npz"} and spec["options"] == {"seed": 3}
    assert base["model"]["num_classes"] == 10  # the base is not modified


def test_round_trip_with_live_events(service, assets, tmp_path):
    uploads = []
    with Client(service.url) as c:
        job = c.submit(**spec_kwargs(assets, batch_size=8),
                       on_upload=lambda path, kind: (uploads.append((path.name, kind)) or None))
        assert uploads == [("model.safetensors", "model"), ("target.npz", "dataset"), ("eval.npz", "dataset")]
        assert job["status"] in ("queued", "running")
        assert job["spec"]["eval_data"]["upload_id"] and job["spec"]["options"]["batch_size"] == 8

        events: list[Event] = list(c.events(job["id"], timeout=300))
        kinds = [e.event for e in events]
        assert kinds[0] == "status" and kinds[-1] == "end" and kinds.count("end") == 1, kinds
        final = events[-1].data
        assert final["status"] == "succeeded", (final["error"], service.logs())

        progress = [e.data for e in events if e.event == "progress"]
        assert progress and all({"done", "total", "fraction", "phase", "images_per_second", "eta_s"} <= set(p)
                                for p in progress)
        assert len(progress) >= 2 and progress[-1]["done"] == progress[-1]["total"] == final["progress"]["total"]
        steps = [e.data for e in events if e.event == "step"]
        total = final["progress"]["total"]
        assert [s["step"] for s in steps] == list(range(total))  # every step, once, in order
        assert all(isinstance(s["loss"], float) and isinstance(s["entropy"], float) for s in steps)
        assert [e.id for e in events if e.event == "step"][-1] == str(total - 1)

        # The same per-step values as the stored curves.
        history = c.artifact_json(job["id"], "history.json")["steps"]
        assert [round(s["loss"], 6) for s in steps] == [round(s["loss"], 6) for s in history]

        # Reconnecting with Last-Event-ID replays only what came after it.
        resumed = list(c.events(job["id"], last_event_id=str(total - 3)))
        assert [e.data["step"] for e in resumed if e.event == "step"] == [total - 2, total - 1]
        assert resumed[-1].event == "end"

        # wait() and download() as before.
        assert c.wait(job["id"], timeout=10)["status"] == "succeeded"
        path = c.download(job["id"], dest=tmp_path)
        assert path == tmp_path / "model.safetensors"
        listed = {a["name"]: a["sha256"] for a in final["artifacts"]}
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed["model.safetensors"]

        with pytest.raises(ApiError) as err:
            list(c.events("no-such-job"))
        assert err.value.status == 404 and err.value.code == "job_not_found"


def test_stream_headers(embedded_service, assets):
    from tests.ux_helpers import finished_job

    job = finished_job(embedded_service.url, assets)
    with httpx.stream("GET", f"{embedded_service.url}/v1/jobs/{job['id']}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        body = r.read().decode()
    assert body.startswith("retry: ") and body.rstrip().splitlines()[-3] == "event: end"
