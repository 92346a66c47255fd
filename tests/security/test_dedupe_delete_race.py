"""Row 7: content dedupe is safe under deletion, on both databases. DELETE an upload while identical
bytes are being uploaded again, 200 times: no 500, the new upload is never lost (its blob is sealed and
complete) and no blob, chunk or file is left behind (PostgreSQL: chunk rows; SQLite, embedded: blob
files). (The new upload used to point at the blob the DELETE was removing: FK violation, 500, upload
lost.)"""
from __future__ import annotations

import os
import threading

import httpx

from app.storage.files import path_in
from tests.helpers import blob_dir, blob_files
from tests.security.conftest import orphaned_blobs, sql, tenant

TRIALS = 200


def test_delete_while_identical_bytes_are_uploaded(sec_api):
    with tenant(sec_api) as owner:
        second = httpx.Client(base_url=owner.base_url, headers=owner.headers, timeout=120)
        kept: dict[str, int] = {}
        try:
            for trial in range(TRIALS):
                content = os.urandom(96 * 1024)
                first = owner.post("/v1/uploads", params={"kind": "dataset"}, content=content)
                assert first.status_code == 201, first.text
                barrier = threading.Barrier(2)
                answers: dict[str, httpx.Response] = {}

                def delete():
                    barrier.wait(timeout=30)
                    answers["delete"] = owner.delete(f"/v1/uploads/{first.json()['id']}")

                def again():
                    barrier.wait(timeout=30)
                    answers["upload"] = second.post("/v1/uploads", params={"kind": "dataset"}, content=content)

                threads = [threading.Thread(target=delete), threading.Thread(target=again)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=120)
                assert answers["delete"].status_code == 204, (trial, answers["delete"].text)
                assert answers["upload"].status_code == 201, (trial, answers["upload"].text)
                kept[answers["upload"].json()["id"]] = len(content)
        finally:
            second.close()
        # every re-upload survived with complete, sealed bytes
        rows = sql(sec_api, "select u.id, u.size, b.size, b.sha256, u.sha256, "
                            "(select coalesce(sum(length(c.data)), 0) from blob_chunks c where c.blob_id = b.id), "
                            "b.in_file, b.id from uploads u join blobs b on b.id = u.blob_id")
        by_id = {r[0]: r for r in rows}
        for upload_id, size in kept.items():
            _, usize, bsize, bsha, usha, stored, in_file, blob_id = by_id[upload_id]
            if in_file:
                stored = path_in(blob_dir(sec_api), blob_id).stat().st_size
            assert in_file == (blob_dir(sec_api) is not None)
            assert usize == bsize == stored == size and bsha == usha, by_id[upload_id]
        for upload_id in kept:
            assert owner.delete(f"/v1/uploads/{upload_id}").status_code == 204
    assert orphaned_blobs(sec_api) == []
    assert sql(sec_api, "select count(*) from blob_chunks where blob_id not in (select id from blobs)")[0][0] == 0
    if blob_dir(sec_api) is not None:  # every file went with its row; no temporary file is left
        blobs = sql(sec_api, "select id from blobs where in_file")
        assert set(blob_files(sec_api)) == {path_in(blob_dir(sec_api), blob_id) for blob_id, in blobs}
