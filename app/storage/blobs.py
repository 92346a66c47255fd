"""Blob bytes live in `blob_chunks` rows of at most `chunk_bytes`. Writers commit chunk by chunk (so
neither side ever holds a whole file in memory); a blob becomes visible under its sha256 only when it is
complete, and identical content is stored once. Each chunk is one autocommitted insert (one round
trip) whose commit does not wait for the disk; the seal's commit does, and flushes the chunks before
it (app.db.session.get_deferred_durability_engine): one disk flush per blob instead of one per chunk."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..db.models import Blob, BlobChunk
from ..db.session import get_deferred_durability_engine, session_scope


_INSERT_CHUNK = insert(BlobChunk)


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
        with get_deferred_durability_engine(self.db_url).connect() as conn:
            conn.execute(_INSERT_CHUNK, {"blob_id": self.blob_id, "seq": self._seq, "offset": self.size,
                                         "data": data})
        self._hash.update(data)
        self._seq += 1
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def seal(self, s) -> str:
        """In the caller's transaction: give the complete bytes their sha256 and return this blob's id,
        or, when identical content is already stored, that blob's id, locked (a concurrent deletion waits
        for the caller's commit, so the reference the caller adds cannot dangle). The caller drops this
        copy with abort() after committing when the returned id is not `self.blob_id`."""
        digest = self.sha256
        # A write first: SQLite then holds its write lock before it reads (no stale snapshot).
        s.execute(update(Blob).where(Blob.id == self.blob_id).values(size=self.size))
        existing = s.scalar(select(Blob.id).where(Blob.sha256 == digest))
        if existing is not None and lock_blob(s, existing):
            return existing
        s.execute(update(Blob).where(Blob.id == self.blob_id).values(sha256=digest))
        return self.blob_id

    def finish(self, record: Callable[[Session, str], object] | None = None,
               before: Callable[[Session], object] | None = None) -> tuple[str, str, int]:
        """Seal the blob and, in the same transaction, `record(session, blob_id)` the row that references
        it (`before(session)` runs first: e.g. a tenant lock and quota check). Returns (blob_id, sha256,
        size); when the content already exists, the new copy is dropped and the existing blob's id
        returned. `self.recorded` holds what `record` returned."""
        for attempt in range(2):
            try:
                with session_scope(self.db_url) as s:
                    if before is not None:
                        before(s)
                    blob_id = self.seal(s)
                    self.recorded = record(s, blob_id) if record is not None else None
                break
            except IntegrityError:  # a concurrent writer sealed the same content first: use its blob
                if attempt:
                    raise
        if blob_id != self.blob_id:
            self.abort()
        return blob_id, self.sha256, self.size

    def abort(self) -> None:
        with session_scope(self.db_url) as s:
            s.execute(delete(BlobChunk).where(BlobChunk.blob_id == self.blob_id))
            s.execute(delete(Blob).where(Blob.id == self.blob_id))


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


def lock_blob(session, blob_id: str) -> bool:
    """Row-lock a blob until the transaction ends (PostgreSQL; SQLite holds its database write lock);
    False when it no longer exists."""
    return session.execute(update(Blob).where(Blob.id == blob_id).values(size=Blob.size)).rowcount == 1


def delete_blob_if_unreferenced(session, blob_id: str) -> bool:
    """Remove a blob and its chunks when no upload or artifact points at it any more (content is shared
    between identical uploads and artifacts). Runs in the caller's transaction, under the blob's lock, so
    an upload that reuses the blob concurrently either commits its reference first (the blob stays) or
    finds it gone (and keeps its own copy)."""
    from ..db.models import Artifact, Upload

    if not lock_blob(session, blob_id):
        return False
    if session.scalar(select(Upload.id).where(Upload.blob_id == blob_id).limit(1)) is not None:
        return False
    if session.scalar(select(Artifact.id).where(Artifact.blob_id == blob_id).limit(1)) is not None:
        return False
    session.execute(delete(BlobChunk).where(BlobChunk.blob_id == blob_id))
    session.execute(delete(Blob).where(Blob.id == blob_id))
    return True
