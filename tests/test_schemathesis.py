"""Schemathesis: requests generated from the OpenAPI schema, sent to a real API process (uvicorn + worker
on a fresh PostgreSQL database and Redis: the `pg_service` fixture). A 5xx is a bug (docs/ARCHITECTURE.md §1).

Each operation gets valid and schema-violating requests (positive and negative generation, the coverage
phase's boundary values, then fuzzing), bounded (MAX_EXAMPLES per operation and phase) and deterministic
(derandomized, no example database). Upload bodies are capped at MAX_BODY_BYTES.

The schema is built in-process from `create_app()` (same code the server runs; test_live_schema_is_the_
tested_schema checks they are identical) because schemathesis' lazy `from_fixture` loader does not work
with pytest >= 9.2 (it sets `Node._nodeid`, which pytest removed).

Checks beyond `not_a_server_error` that pass honestly and are kept: content type, response headers,
response schema, missing required header, undeclared method (405 with `Allow`), negative data rejected.
Not applied: `status_code_conformance` (the routes don't declare their 404/409/413/415/503 responses),
`positive_data_acceptance` (a schema-valid job spec still gets 422 for an unknown upload id or method,
and a schema-valid `cursor` string can be an invalid cursor: both by design).
"""
from __future__ import annotations

import base64
import os
import zlib

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, missing_required_header,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, unsupported_method)

from app.main import create_app
from app.contract.catalog import CATALOG

pytestmark = pytest.mark.services

MAX_EXAMPLES = int(os.environ.get("ADAPTD_SCHEMATHESIS_EXAMPLES", "40"))  # more for a deeper local run
MAX_BODY_BYTES = 16 * 1024

OPENAPI = create_app().openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")

CHECKS = [not_a_server_error, content_type_conformance, response_headers_conformance,
          response_schema_conformance, missing_required_header, unsupported_method, negative_data_rejection]
# POST /v1/uploads takes any bytes: a "negative" body is still a valid upload once serialized.
RAW_BODY_CHECKS = [c for c in CHECKS if c is not negative_data_rejection]


def _cap(body):
    """Keep generated upload bodies small (octet-stream bytes, or the multipart `file` part)."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body[:MAX_BODY_BYTES])
    if isinstance(body, dict):
        return {k: _cap(v) for k, v in body.items()}
    return body


def _make_upload(c: httpx.Client, kind: str) -> str:
    r = c.post("/v1/uploads", params={"kind": kind, "filename": f"{kind}.bin"}, content=os.urandom(256))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _make_job(c: httpx.Client, model: str, dataset: str) -> str:
    """A queued job, cancelled at once (random bytes as the model: it could not run anyway)."""
    r = c.post("/v1/jobs", json={"method": "source", "data": {"upload_id": dataset},
                                 "model": {"upload_id": model, "architecture": "digit_cnn", "num_classes": 10}})
    assert r.status_code == 202, r.text
    c.post(f"/v1/jobs/{r.json()['id']}/cancel").raise_for_status()
    return r.json()["id"]


@pytest.fixture(scope="module")
def known(pg_service):
    """Real ids for the generator to hit besides random ones (random ids only ever get 404s)."""
    c = httpx.Client(base_url=pg_service.url, timeout=30)
    model, dataset = _make_upload(c, "model"), _make_upload(c, "dataset")
    yield {"client": c, "model": model, "dataset": dataset, "job": _make_job(c, model, dataset)}
    c.close()


def _use_known_ids(case, known) -> None:
    """For half of the schema-valid cases (chosen deterministically), put real ids where the schema
    has ids, and a real method and architecture name into job specs, so the requests get past the
    404/422 of unknown names into the code behind them. DELETEs get fresh throwaway ids."""
    if case.meta is None or case.meta.generation.mode.name != "POSITIVE":
        return
    pick = zlib.crc32(repr((case.path_parameters, case.query, case.body)).encode())
    if pick % 2:
        return
    params = case.path_parameters or {}
    if case.method == "DELETE":  # deletes get ids of their own, made for them
        c = known["client"]
        if "job_id" in params:
            params["job_id"] = _make_job(c, known["model"], known["dataset"])
        if "upload_id" in params:
            params["upload_id"] = _make_upload(c, "model")
        return
    if "job_id" in params:
        params["job_id"] = known["job"]
    if "upload_id" in params:
        params["upload_id"] = known["model"]
    body = case.body
    if (case.method, case.path) == ("POST", "/v1/jobs") and isinstance(body, dict):
        methods = sorted(CATALOG)
        body["method"] = methods[pick // 2 % len(methods)]
        for field, kind in (("model", "model"), ("data", "dataset"), ("eval_data", "dataset")):
            if isinstance(body.get(field), dict):
                body[field]["upload_id"] = known[kind]
        if isinstance(body.get("model"), dict):  # the schema says str; the validator wants a known one
            body["model"]["architecture"] = "digit_cnn"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_schema(case, pg_service, known):
    case.body = _cap(case.body)
    _use_known_ids(case, known)
    checks = RAW_BODY_CHECKS if (case.method, case.path) == ("POST", "/v1/uploads") else CHECKS
    response = case.call_and_validate(base_url=pg_service.url, checks=checks, timeout=30)
    if (case.method, case.path) == ("POST", "/v1/jobs") and response.status_code == 202:
        # cancel while queued: the shared worker never runs generated jobs
        httpx.post(f"{pg_service.url}/v1/jobs/{response.json()['id']}/cancel", timeout=30).raise_for_status()


def test_live_schema_is_the_tested_schema(pg_service):
    assert httpx.get(f"{pg_service.url}/openapi.json", timeout=10).json() == OPENAPI


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


# Regressions: each of these answered 500 before (PostgreSQL refuses NUL in text and over-long
# varchar values -> sqlalchemy DataError; a cursor whose UTC time leaves year 1..9999 -> OverflowError).
MULTIPART_NUL_FILENAME = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00b"\r\n\r\n'
                          b'xyz\r\n--b--\r\n')


@pytest.mark.parametrize("method, path, kwargs", [
    ("GET", "/v1/jobs/%00", {}),
    ("GET", "/v1/uploads/%00", {}),
    ("POST", "/v1/jobs/%00/cancel", {}),
    ("GET", "/v1/jobs/%00/artifacts/model.safetensors", {}),
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor(b"2024-01-01T00:00:00+00:00|\x00")}}),
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor(b"9999-12-31T23:59:59-14:00|x")}}),
    ("GET", "/v1/jobs", {"params": {"cursor": _cursor(b"0001-01-01T00:00:00+01:00|x")}}),
    ("POST", "/v1/jobs", {"json": {"method": "tent", "data": {"upload_id": "x"},
                                   "model": {"upload_id": "\x00", "architecture": "digit_cnn", "num_classes": 10}}}),
    ("POST", "/v1/uploads", {"params": {"kind": "model", "filename": "a\x00b"}, "content": b"abc"}),
    ("POST", "/v1/uploads", {"params": {"kind": "model"}, "content": MULTIPART_NUL_FILENAME,
                             "headers": {"content-type": "multipart/form-data; boundary=b"}}),
    ("POST", "/v1/uploads", {"params": {"kind": "model"}, "files": {"file": ("a" * 300, b"xyz")}}),
], ids=["job-nul", "upload-nul", "cancel-nul", "artifact-nul", "cursor-nul", "cursor-overflow-high",
        "cursor-overflow-low", "spec-upload-id-nul", "filename-nul", "multipart-filename-nul",
        "multipart-filename-too-long"])
def test_unstorable_values_are_4xx(pg_service, method, path, kwargs):
    r = httpx.request(method, pg_service.url + path, timeout=30, **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_error"


def test_405_says_allow(pg_service):
    # The error handler used to drop the `Allow` header of Starlette's 405 (RFC 9110 requires it).
    r = httpx.request("PUT", f"{pg_service.url}/healthz", timeout=10)
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_empty_idempotency_key_is_no_key(pg_service):
    """An empty `Idempotency-Key:` was stored as the key "", so the second such request hit the unique
    constraint and answered 500."""
    with httpx.Client(base_url=pg_service.url, timeout=30) as c:
        model, dataset = _make_upload(c, "model"), _make_upload(c, "dataset")
    spec = {"method": "source", "data": {"upload_id": dataset},
            "model": {"upload_id": model, "architecture": "digit_cnn", "num_classes": 10}}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{pg_service.url}/v1/jobs", json=spec, headers={"Idempotency-Key": ""}, timeout=30)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        httpx.post(f"{pg_service.url}/v1/jobs/{ids[-1]}/cancel", timeout=30).raise_for_status()
    assert ids[0] != ids[1]
