"""Row 9: size limits on everything a tenant sends. A job body over ADAPTD_MAX_REQUEST_BYTES (64 KiB)
is 413 payload_too_large, declared or chunked, before it is parsed or stored; JSON nested past
ADAPTD_MAX_JSON_DEPTH is 422 (not a 500 from the parser's recursion); list pages are bounded."""
from __future__ import annotations

import json

from tests.security.conftest import spec, tenant, upload


def test_oversized_and_deep_bodies_are_refused(sec_postgres_api, assets):
    with tenant(sec_postgres_api) as c:
        model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
        data = upload(c, assets["target"].read_bytes())
        base = spec(model["id"], data["id"], assets)
        big = {**base, "model": {**base["model"], "arch_kwargs": {"blob": "x" * (2 << 20)}}}
        r = c.post("/v1/jobs", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        assert r.json()["error"]["detail"]["limit_bytes"] == 64 * 1024

        def chunked():  # no Content-Length: counted as it arrives
            text = json.dumps(big).encode()
            for i in range(0, len(text), 16384):
                yield text[i:i + 16384]

        r = c.post("/v1/jobs", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        deep = b'{"method": "tent", "params": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
        r = c.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text

        # just under the limit (JSON whitespace: every field of a spec is itself bounded or checked)
        just_under = (json.dumps(base) + " " * 60000).encode()
        assert 60000 < len(just_under) < 64 * 1024
        r = c.post("/v1/jobs", content=just_under, headers={"Content-Type": "application/json"})
        assert r.status_code == 202, r.text  # under the limit: parsed and accepted as before
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [r.json()["id"]]  # nothing oversized stored
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")

        r = c.get("/v1/jobs", params={"limit": 100000})
        assert r.status_code == 422  # pages are bounded (at most 500 jobs of at most 64 KiB each)
