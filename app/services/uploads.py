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
from ..storage import BlobWriter


def _too_large(limit: int) -> ApiError:
    return ApiError("payload_too_large", f"upload exceeds the limit of {limit} bytes", {"limit_bytes": limit})


async def store_stream(settings: Settings, kind: str, filename: str | None, chunks: AsyncIterator[bytes],
                       declared_length: int | None = None) -> Upload:
    limit = settings.max_upload_bytes
    if declared_length is not None and declared_length > limit:
        raise _too_large(limit)
    url = settings.resolved_database_url
    writer = await run_in_threadpool(BlobWriter, url)
    buf = bytearray()
    try:
        async for piece in chunks:
            buf += piece
            if writer.size + len(buf) > limit:
                raise _too_large(limit)
            if len(buf) >= settings.chunk_bytes:
                data, buf = bytes(buf[:settings.chunk_bytes]), buf[settings.chunk_bytes:]
                await run_in_threadpool(writer.write, data)
        if buf:
            await run_in_threadpool(writer.write, bytes(buf))
        if writer.size == 0:
            raise ApiError("empty_upload", "the upload has no bytes")
        blob_id, sha256, size = await run_in_threadpool(writer.finish)
    except BaseException:
        await run_in_threadpool(writer.abort)
        raise
    return await run_in_threadpool(_record, url, kind, filename, blob_id, sha256, size)


def _record(url: str, kind: str, filename: str | None, blob_id: str, sha256: str, size: int) -> Upload:
    with session_scope(url) as s:
        return repo.add_upload(s, Upload(id=str(uuid.uuid4()), kind=kind, filename=filename, blob_id=blob_id,
                                         size=size, sha256=sha256))


def get_upload(settings: Settings, upload_id: str) -> Upload:
    with session_scope(settings.resolved_database_url) as s:
        upload = repo.get_upload(s, upload_id)
    if upload is None:
        raise ApiError("upload_not_found", f"no upload {upload_id!r}")
    return upload
