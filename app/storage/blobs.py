"""Blob bytes live in `blob_chunks` rows of at most `chunk_bytes`. Writers commit chunk by chunk (so
neither side ever holds a whole file in memory); a blob becomes visible under its sha256 only when it is
complete, and identical content is stored once. Chunk commits do not wait for the disk; the seal's
commit does, and flushes the chunks before it (app.db.session.deferred_durability_scope): one disk
flush per blob instead of one per chunk."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Iterator

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..db.models import Blob, BlobChunk
from ..db.session import deferred_durability_scope, session_scope


class BlobWriter:
    def __init__(self, db_url: str):
        self.db_url = db_url
        self.blob_id = str(uuid.uuid4())
        self.size = 0
        self._seq = 0
        self._hash = hashlib.sha256()
        with session_scope(db_url) as s:
            s.add(Blob(id=self.blob_id, sha256=None, size=0))

    def write(self, data: bytes) -> None:
        if not data:
            return
        with deferred_durability_scope(self.db_url) as conn:
            conn.execute(insert(BlobChunk).values(blob_id=self.blob_id, seq=self._seq, offset=self.size, data=data))
        self._hash.update(data)
        self._seq += 1
        self.size += len(data)

    def finish(self) -> tuple[str, str, int]:
        """Seal the blob. Returns (blob_id, sha256, size); when the content already exists, the new
        copy is dropped and the existing blob's id returned."""
        digest = self._hash.hexdigest()
        with session_scope(self.db_url) as s:
            existing = s.scalar(select(Blob.id).where(Blob.sha256 == digest))
        if existing is None:
            try:
                with session_scope(self.db_url) as s:
                    s.execute(update(Blob).where(Blob.id == self.blob_id).values(sha256=digest, size=self.size))
                return self.blob_id, digest, self.size
            except IntegrityError:  # a concurrent writer sealed the same content first
                with session_scope(self.db_url) as s:
                    existing = s.scalar(select(Blob.id).where(Blob.sha256 == digest))
        self.abort()
        return existing, digest, self.size

    def abort(self) -> None:
        with session_scope(self.db_url) as s:
            s.execute(delete(BlobChunk).where(BlobChunk.blob_id == self.blob_id))
            s.execute(delete(Blob).where(Blob.id == self.blob_id))


def store_file(db_url: str, path: Path, chunk_bytes: int) -> tuple[str, str, int]:
    writer = BlobWriter(db_url)
    try:
        with open(path, "rb") as f:
            while data := f.read(chunk_bytes):
                writer.write(data)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def iter_blob(db_url: str, blob_id: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Yield the bytes [start, end) of a blob, one chunk row per query (bounded memory)."""
    with session_scope(db_url) as s:
        first = s.scalar(select(BlobChunk.seq).where(BlobChunk.blob_id == blob_id, BlobChunk.offset <= start)
                         .order_by(BlobChunk.offset.desc()).limit(1))
    seq = first or 0
    while True:
        with session_scope(db_url) as s:
            row = s.execute(select(BlobChunk.offset, BlobChunk.data)
                            .where(BlobChunk.blob_id == blob_id, BlobChunk.seq == seq)).first()
        if row is None:
            return
        offset, data = row
        lo = max(start - offset, 0)
        hi = len(data) if end is None else min(len(data), end - offset)
        if hi > lo:
            yield bytes(data[lo:hi])
        if end is not None and offset + len(data) >= end:
            return
        seq += 1


def copy_blob_to_file(db_url: str, blob_id: str, path: Path) -> int:
    n = 0
    with open(path, "wb") as f:
        for data in iter_blob(db_url, blob_id):
            f.write(data)
            n += len(data)
    return n


def delete_blob_if_unreferenced(session, blob_id: str) -> bool:
    """Remove a blob and its chunks when no upload or artifact points at it any more (content is shared
    between identical uploads and artifacts). Runs in the caller's transaction."""
    from ..db.models import Artifact, Upload

    if session.scalar(select(Upload.id).where(Upload.blob_id == blob_id).limit(1)) is not None:
        return False
    if session.scalar(select(Artifact.id).where(Artifact.blob_id == blob_id).limit(1)) is not None:
        return False
    session.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id))
    session.execute(delete(Blob).where(Blob.id == blob_id))
    return True
