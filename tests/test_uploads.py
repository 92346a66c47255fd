"""Uploads: streamed raw body and multipart, sha256, dedupe, size limit, bounded API memory. Both services
keep blob bytes in files (ADAPTD_BLOB_DIR; embedded: its default); chunk rows: tests/test_blob_files.py
and tests/security."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx
import psutil

from app.config import get_settings
from tests.helpers import blob_dir, blob_files


def test_raw_and_multipart_upload_dedupe(service, monkeypatch):
    payload = os.urandom(3 * 1024 * 1024 + 17)  # spans several 1 MiB chunks
    digest = hashlib.sha256(payload).hexdigest()
    raw = httpx.post(f"{service.url}/v1/uploads", params={"kind": "dataset", "filename": "a.npz"}, content=payload)
    assert raw.status_code == 201, raw.text
    body = raw.json()
    assert body["sha256"] == digest and body["size"] == len(payload) and body["kind"] == "dataset"
    multi = httpx.post(f"{service.url}/v1/uploads", params={"kind": "dataset"},
                       files={"file": ("b.npz", payload, "application/octet-stream")})
    assert multi.status_code == 201, multi.text
    assert multi.json()["sha256"] == digest and multi.json()["filename"] == "b.npz"
    got = httpx.get(f"{service.url}/v1/uploads/{body['id']}").json()
    assert got == body
    # identical bytes are stored once: one blob, two upload records (and one file, none left in tmp/)
    assert _blob_count(service, digest) == 1
    if blob_dir(service) is not None:
        same = [p for p in blob_files(service) if p.stat().st_size == len(payload) and p.read_bytes() == payload]
        assert len(same) == 1, same
        assert not (blob_dir(service) / "tmp").exists() or not any((blob_dir(service) / "tmp").iterdir())
    # the chunks (stored by concurrent writes) read back in order
    monkeypatch.setattr(get_settings(), "blob_dir", blob_dir(service))
    assert _stored_bytes(service, body["id"]) == payload


def _db_url(service) -> str:
    return service.env.get("ADAPTD_DATABASE_URL") or f"sqlite:///{service.env['ADAPTD_HOME']}/adaptd.db"


def _blob_count(service, digest: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(_db_url(service))
    with engine.connect() as conn:
        n = conn.execute(text("select count(*) from blobs where sha256 = :d"), {"d": digest}).scalar()
    engine.dispose()
    return n


def _stored_bytes(service, upload_id: str) -> bytes:
    from sqlalchemy import create_engine, text

    from app.storage import iter_blob

    engine = create_engine(_db_url(service))
    with engine.connect() as conn:
        blob_id = conn.execute(text("select blob_id from uploads where id = :i"), {"i": upload_id}).scalar()
    engine.dispose()
    return b"".join(iter_blob(_db_url(service), blob_id))


def test_size_limit_413(embedded_service):
    limit = int(embedded_service.env["ADAPTD_MAX_UPLOAD_BYTES"])
    url = f"{embedded_service.url}/v1/uploads"
    # declared too large: refused before reading
    r = httpx.post(url, params={"kind": "dataset"}, content=b"x" * (limit + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["detail"]["limit_bytes"] == limit

    # streamed without a length: refused when the limit is crossed
    def chunks():
        block = b"y" * (1024 * 1024)
        for _ in range(limit // len(block) + 2):
            yield block

    r = httpx.post(url, params={"kind": "dataset"}, content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    empty = httpx.post(url, params={"kind": "dataset"}, content=b"")
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "empty_upload"


def test_large_upload_streams_with_bounded_api_memory(pg_service):
    """A 384 MiB upload: the API's resident memory must stay far below the upload's size."""
    size = 384 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    api = psutil.Process(pg_service.api.pid)

    def rss() -> int:  # `adaptd api` and its uvicorn worker processes
        total = 0
        for p in [api, *api.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    baseline = rss()
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    digest = hashlib.sha256()

    def body():
        for i in range(size // len(block)):
            chunk = block[:-4] + i.to_bytes(4, "little")  # distinct content per chunk
            digest.update(chunk)
            yield chunk

    t0 = time.perf_counter()
    r = httpx.post(f"{pg_service.url}/v1/uploads", params={"kind": "dataset"}, content=body(), timeout=600)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    assert r.status_code == 201, r.text
    assert r.json()["size"] == size and r.json()["sha256"] == digest.hexdigest()
    growth = peak[0] - baseline
    print(f"\nupload {size / 2**20:.0f} MiB in {seconds:.1f} s = {size / 2**20 / seconds:.1f} MiB/s; "
          f"API RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 96 * 1024 * 1024, f"API memory grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB upload"
