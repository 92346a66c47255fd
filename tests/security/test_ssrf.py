"""Row 1: notify_url pointing into the service's own network. Refused at submit (422
notify_url_not_allowed) in every spelling; at send time the name is resolved once, the request goes to
that checked address and redirects are not followed; ADAPTD_WEBHOOK_ALLOWED_HOSTS lets operators name
internal hooks. All traffic stays on loopback."""
from __future__ import annotations

import socket

import pytest

from worker.notify import deliver
from tests.security.conftest import spec, start, tenant, upload, wait_job
from tests.services import drop_pg_database
from tests.test_webhook import Receiver

INTERNAL = ["http://127.0.0.1:8316/x", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:6379/",
            "http://[::1]:5432/", "http://10.0.0.1/", "http://2130706433/", "http://0x7f000001/",
            "http://0177.0.0.1/", "http://127.1/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/",
            "http://0.0.0.0/", "http://[::]/", "http://224.0.0.1/", "http://100.64.0.1/", "http://192.168.1.1/",
            "http://172.16.0.1/", "http://240.0.0.1/", "http://localhost:8000/", "https://localhost./"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_internal_notify_urls_are_refused_at_submit(sec_postgres, assets):
    with tenant(sec_postgres) as c:
        model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
        data = upload(c, assets["target"].read_bytes())
        for url in INTERNAL:
            r = c.post("/v1/jobs", json=spec(model["id"], data["id"], assets, notify_url=url))
            assert r.status_code == 422 and r.json()["error"]["code"] == "notify_url_not_allowed", (url, r.text)
        assert c.get("/v1/jobs").json()["items"] == []  # nothing was stored


def test_loopback_webhook_arrives_only_when_allowed(receiver):
    body = b'{"id": "x"}'
    assert deliver(receiver.url, body, None, attempts=1) is False  # refused at send time too
    assert receiver.requests == []
    assert deliver(receiver.url, body, None, attempts=1, allowed="127.0.0.0/8") is True
    assert len(receiver.requests) == 1 and receiver.requests[0]["body"] == body


def test_name_resolved_once_connection_to_the_checked_address(receiver, monkeypatch):
    """The host name is looked up once per delivery (retries reuse the checked address: a DNS answer
    that changes later cannot redirect the request); the name travels in Host."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def spy(host, *args, **kwargs):  # records, then asks the real resolver
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    receiver.statuses = [503, 503]
    port = receiver.server.server_address[1]
    url = f"http://localhost:{port}/hook"
    assert deliver(url, b"{}", None, attempts=3, backoff_s=0.01, allowed="localhost") is True
    assert len(receiver.requests) == 3
    assert lookups.count("localhost") == 1, lookups
    assert {r["headers"]["Host"] for r in receiver.requests} == {f"localhost:{port}"}


def test_redirects_are_not_followed(receiver):
    """An allowed hook answering 307 towards another loopback listener: that listener gets nothing."""
    import http.server
    import threading

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)
            self.send_header("Location", receiver.url)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        assert deliver(url, b"{}", None, attempts=2, backoff_s=0.01, allowed="127.0.0.1") is False
        assert receiver.requests == []
    finally:
        server.shutdown()
        server.server_close()


def test_job_webhook_reaches_an_allowed_internal_hook(tmp_path, assets, receiver):
    service, name = start(tmp_path, "postgres", ADAPTD_WEBHOOK_ALLOWED_HOSTS="127.0.0.1/32")
    try:
        with tenant(service) as c:
            model = upload(c, assets["model"].read_bytes(), "model", "m.safetensors")
            data = upload(c, assets["target"].read_bytes())
            r = c.post("/v1/jobs", json={**spec(model["id"], data["id"], assets, notify_url=receiver.url),
                                         "method": "source"})
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["id"])
            calls = receiver.wait_for(1, timeout=60)
            assert b'"id":"' + job["id"].encode() in calls[0]["body"].replace(b" ", b"")
    finally:
        service.stop()
        drop_pg_database(name)
