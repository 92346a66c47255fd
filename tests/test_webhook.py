"""notify_url webhooks: the worker POSTs the job's final state, signed with HMAC-SHA256
(X-Adaptd-Signature: sha256=<hex> over the raw body, key ADAPTD_WEBHOOK_SECRET), once per job, retrying
transient failures with exponential backoff and never failing the job."""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest

from app.client import ApiError, Client
from worker.notify import SIGNATURE_HEADER, deliver, sign, verify
from tests.services import free_port

LOOPBACK = "127.0.0.1/32"  # webhooks to loopback are refused unless allowed (app/netguard.py)


class Receiver:
    """A loopback HTTP server that records POSTs and answers with the next planned status."""

    def __init__(self, statuses: list[int] | None = None):
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "at": time.monotonic()})
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/adaptd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n:
            assert time.monotonic() < deadline, f"{len(self.requests)} of {n} webhook calls after {timeout} s"
            time.sleep(0.1)
        return self.requests

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_signature_is_hmac_sha256_of_the_raw_body():
    body = b'{"id":"x","status":"succeeded"}'
    expected = "sha256=" + hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    assert sign("k3y", body) == expected
    assert verify("k3y", body, expected) and not verify("k3y", body + b" ", expected)
    assert not verify("other", body, expected) and not verify("k3y", body, None)


def test_deliver_retries_with_backoff_then_succeeds(receiver):
    receiver.statuses = [503, 500]
    sleeps: list[float] = []
    body = b'{"hello": "world"}'
    assert deliver(receiver.url, body, "s3cret", attempts=4, backoff_s=0.5, sleep=sleeps.append,
                   allowed=LOOPBACK) is True
    assert len(receiver.requests) == 3 and sleeps == [0.5, 1.0]  # exponential backoff
    for req in receiver.requests:
        assert req["body"] == body and verify("s3cret", req["body"], req["headers"][SIGNATURE_HEADER])
    # one delivery id across the retries, so a receiver can drop duplicates
    assert len({r["headers"]["X-Adaptd-Delivery"] for r in receiver.requests}) == 1


def test_deliver_gives_up_without_raising(receiver):
    receiver.statuses = [500] * 10
    t0 = time.monotonic()
    assert deliver(receiver.url, b"{}", None, attempts=3, backoff_s=0.01, allowed=LOOPBACK) is False
    assert len(receiver.requests) == 3 and time.monotonic() - t0 < 5
    assert SIGNATURE_HEADER not in receiver.requests[0]["headers"]  # no secret: unsigned
    receiver.requests.clear()
    receiver.statuses = [404]
    assert deliver(receiver.url, b"{}", "k", attempts=3, backoff_s=0.01, allowed=LOOPBACK) is False
    assert len(receiver.requests) == 1  # a 4xx is the receiver's answer, not a transient failure
    t0 = time.monotonic()
    assert deliver(f"http://127.0.0.1:{free_port()}/", b"{}", "k", attempts=2, backoff_s=0.01,
                   timeout_s=1, allowed=LOOPBACK) is False  # nobody listens
    assert time.monotonic() - t0 < 5


def test_job_webhooks_end_to_end(pg_service, assets, receiver):
    """On PostgreSQL + Redis + a worker process: a succeeded and a failed job each POST their final
    state once, signed with the service's secret."""
    secret = pg_service.env["ADAPTD_WEBHOOK_SECRET"]
    with Client(pg_service.url) as c:
        model = c.upload(assets["model"], "model")
        data = c.upload(assets["target"], "dataset")
        common = dict(model=model, data=data, architecture="digit_cnn", arch_kwargs=assets["arch_kwargs"],
                      preprocess=assets["preprocess"], options={"batch_size": 64}, notify_url=receiver.url)
        with pytest.raises(ApiError) as err:
            c.submit(method="source", num_classes=10, **{**common, "notify_url": "ftp://example.org/x"})
        assert err.value.status == 422 and "notify_url" in err.value.message

        ok = c.submit(method="source", num_classes=10, **common)
        # eval_data without labels passes the submit checks and fails in the worker (eval_data_unlabelled)
        bad = c.submit(method="source", num_classes=10, eval_data=data, **common)
        finals = {j: c.wait(j, timeout=180) for j in (ok["id"], bad["id"])}
    assert finals[ok["id"]]["status"] == "succeeded", finals[ok["id"]]["error"]
    assert finals[bad["id"]]["status"] == "failed"

    requests = receiver.wait_for(2)
    time.sleep(1.0)
    assert len(receiver.requests) == 2  # once per job
    by_job = {}
    for req in requests:
        assert req["path"] == "/hooks/adaptd"
        assert req["headers"]["Content-Type"] == "application/json"
        assert verify(secret, req["body"], req["headers"][SIGNATURE_HEADER]), req["headers"]
        payload = json.loads(req["body"])
        assert req["headers"]["X-Adaptd-Job-Id"] == payload["id"]
        assert req["headers"]["X-Adaptd-Event"] == f"job.{payload['status']}"
        by_job[payload["id"]] = payload
    # the body is the job's final state, as GET /v1/jobs/{id} returns it
    for job_id, final in finals.items():
        got = by_job[job_id]
        assert {k: got[k] for k in ("status", "finished_at", "metrics", "error", "artifacts")} == \
               {k: final[k] for k in ("status", "finished_at", "metrics", "error", "artifacts")}
    assert by_job[bad["id"]]["error"]["code"] and by_job[ok["id"]]["spec"]["notify_url"] == receiver.url
