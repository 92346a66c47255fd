"""Uploads: stream bytes into the blob store, enforce the size limit, dedupe by content."""
from __future__ import annotations

import uuid
from typing import AsyncIterator

from starlette.concurrency import run_in_threadpool

from ..config import Settings
from ..db import repo
from ..db.models import Upload
from ..db.session import session_scope
from ..errors import ApiError
from ..storage import BlobSwept, BlobWriter, delete_blob_if_unreferenced


def _too_large(limit: int) -> ApiError:
    return ApiError("payload_too_large", f"upload exceeds the limit of {limit} bytes", {"limit_bytes": limit})


def _over_quota(quota: int, used: int) -> ApiError:
    return ApiError("storage_quota_exceeded", f"this upload would exceed the tenant's storage quota of "
                    f"{quota} bytes ({used} in use)", {"limit_bytes": quota, "used_bytes": used})


def upload_limits(settings: Settings, tenant_id: str) -> tuple[int, int, int]:
    """(max upload bytes, storage quota, storage in use) for a tenant."""
    with session_scope(settings.resolved_database_url) as s:
        tenant = repo.get_tenant(s, tenant_id)
        used = repo.storage_used(s, tenant_id)
    max_upload = min(settings.max_upload_bytes, (tenant and tenant.max_upload_bytes) or settings.max_upload_bytes)
    quota = (tenant and tenant.max_storage_bytes) or settings.tenant_max_storage_bytes
    return max_upload, quota, used


async def store_stream(settings: Settings, tenant_id: str, kind: str, filename: str | None,
                       chunks: AsyncIterator[bytes], declared_length: int | None = None) -> Upload:
    if filename is not None and (len(filename) > 255 or "\x00" in filename):
        # Checked before any byte is stored: a refused upload leaves nothing behind.
        raise ApiError("validation_error", "filename: at most 255 characters, no NUL", {"field": "filename"})
    limit, quota, used = await run_in_threadpool(upload_limits, settings, tenant_id)
    if declared_length is not None and declared_length > limit:
        raise _too_large(limit)
    if declared_length is not None and used + declared_length > quota:
        raise _over_quota(quota, used)
    url = settings.resolved_database_url
    writer = await run_in_threadpool(BlobWriter, url)
    pieces, buffered, received, chunk = [], 0, 0, settings.chunk_bytes
    # Chunks are stored while the next ones arrive (BlobWriter.write_async: a few inserts in flight, the
    # hash in order beside them), so memory stays at a few chunks per upload. A chunk is joined from the
    # pieces the server received (one copy), not grown in a buffer.
    try:
        async for piece in chunks:
            received += len(piece)
            if received > limit:
                raise _too_large(limit)
            if used + received > quota:
                raise _over_quota(quota, used)
            pieces.append(piece)
            buffered += len(piece)
            while buffered >= chunk:
                joined = b"".join(pieces)
                data, rest = (joined, b"") if buffered == chunk else (joined[:chunk], joined[chunk:])
                pieces, buffered = ([rest] if rest else []), len(rest)
                await writer.write_async(data)
        await writer.write_async(b"".join(pieces))
        await writer.flush()
        if writer.size == 0:
            raise ApiError("empty_upload", "the upload has no bytes")
        size = writer.size

        def within_quota(s) -> None:
            # Under the tenant's lock: concurrent uploads cannot all pass the quota check.
            repo.lock_tenant(s, tenant_id)
            now_used = repo.storage_used(s, tenant_id)
            if now_used + size > quota:
                raise _over_quota(quota, now_used)

        def record(s, blob_id: str) -> Upload:
            return repo.add_upload(s, Upload(id=str(uuid.uuid4()), tenant_id=tenant_id, kind=kind,
                                             filename=filename, blob_id=blob_id, size=size, sha256=writer.sha256))

        try:
            await run_in_threadpool(writer.finish, record, within_quota)
        except BlobSwept:
            raise ApiError("upload_expired", f"the upload took longer than {settings.blob_sweep_after_s} s "
                           "(ADAPTD_BLOB_SWEEP_AFTER_S) and its bytes were swept; send it again") from None
    except BaseException:
        await writer.flush(raise_errors=False)  # nothing may still write when the blob is dropped
        await run_in_threadpool(writer.abort)
        raise
    return writer.recorded


def get_upload(settings: Settings, tenant_id: str, upload_id: str) -> Upload:
    with session_scope(settings.resolved_database_url) as s:
        upload = repo.get_upload(s, upload_id, tenant_id)
    if upload is None:
        raise ApiError("upload_not_found", f"no upload {upload_id!r}")
    return upload


def delete_upload(settings: Settings, tenant_id: str, upload_id: str) -> None:
    """Remove the upload and, when nothing else references them, its bytes. Refused while a queued or
    running job uses it."""
    with session_scope(settings.resolved_database_url) as s:
        repo.lock_tenant(s, tenant_id)  # first: SQLite takes its write lock before reading
        if repo.get_upload(s, upload_id, tenant_id) is None:
            raise ApiError("upload_not_found", f"no upload {upload_id!r}")
        users = repo.active_jobs_using_upload(s, upload_id, tenant_id)
        if users:
            raise ApiError("upload_in_use", f"upload {upload_id} is used by active jobs: cancel them first",
                           {"jobs": users})
        delete_blob_if_unreferenced(s, repo.delete_upload(s, upload_id))
