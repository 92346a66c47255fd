"""Blob bytes live in `blob_chunks` rows of at most `chunk_bytes` or, when ADAPTD_BLOB_DIR is set, in one
file per blob (app/storage/files.py); the `blobs` row (`in_file` says which), deduplication, references
and locks are the same either way. Writers store chunk by chunk (so neither side ever holds a whole file
in memory); a blob becomes visible under its sha256 only when it is complete, and identical content is
stored once. Each chunk row is one autocommitted insert (one round trip) whose commit does not wait for
the disk; the seal's commit does, and flushes the chunks before it
(app.db.session.get_deferred_durability_engine): one disk flush per blob instead of one per chunk. A
file is flushed and renamed before the seal commits. The statements are in app/db/repo.py."""
from __future__ import annotations

import asyncio
import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from ..config import get_settings
from ..db import repo
from ..db.session import get_deferred_durability_engine, session_scope
from . import files

# Chunk writes in flight per upload (`write_async`). Each insert takes its own pooled connection, so
# PostgreSQL stores them in several backends, on several cores: with one in flight, an upload went
# at the speed of one backend storing (TOAST, WAL) while the API waited (BENCHMARKS.md, Uploads, third
# pass). SQLite has one writer at a time: a second insert would only wait for the lock. A file takes
# writes at their offsets, so the next one may start while one is in the page cache.
WRITES_IN_FLIGHT = {"postgresql": 3, "sqlite": 1, "file": 2}


class BlobSwept(RuntimeError):
    """The writer's unsealed row is gone: app/storage/sweep.py took it for abandoned."""


class BlobWriter:
    def __init__(self, db_url: str):
        self.db_url = db_url
        self.blob_id = str(uuid.uuid4())
        self.size = 0
        self._seq = 0
        self._hash = hashlib.sha256()
        self._file = files.ContentFile(self.blob_id) if files.root() is not None else None
        self._depth = WRITES_IN_FLIGHT["file" if self._file else db_url.split(":", 1)[0].split("+", 1)[0]]
        self._storing: set[asyncio.Future] = set()
        self._hashing: asyncio.Future | None = None
        try:
            with session_scope(db_url) as s:
                repo.add_blob(s, self.blob_id, in_file=self._file is not None)
        except BaseException:
            if self._file:
                self._file.discard()
            raise

    def _claim(self, data: bytes) -> tuple[int, int]:
        """The next chunk's (seq, offset)."""
        seq, offset = self._seq, self.size
        self._seq += 1
        self.size += len(data)
        return seq, offset

    def _store(self, seq: int, offset: int, data: bytes) -> None:
        if self._file:
            self._file.store(offset, data)
            return
        with get_deferred_durability_engine(self.db_url).connect() as conn:
            repo.add_blob_chunk(conn, self.blob_id, seq, offset, data)

    def write(self, data: bytes) -> None:
        """Store and hash the next chunk, here and now."""
        if data:
            self._store(*self._claim(data), data)
            self._hash.update(data)

    async def write_async(self, data: bytes) -> None:
        """The next chunk, from the event loop: its write runs in a thread alongside up to
        WRITES_IN_FLIGHT - 1 earlier ones, and the bytes are hashed in order in a thread of their own,
        so receiving, hashing and storing overlap. Returns once the chunk is under way; memory: the
        chunks in flight. `flush` waits for all of them and raises the first failure."""
        if not data:
            return
        while len(self._storing) >= self._depth:
            done, self._storing = await asyncio.wait(self._storing, return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                f.result()
        seq, offset = self._claim(data)
        self._storing.add(asyncio.ensure_future(run_in_threadpool(self._store, seq, offset, data)))
        if self._hashing is not None:
            await self._hashing
        self._hashing = asyncio.ensure_future(run_in_threadpool(self._hash.update, data))

    async def flush(self, raise_errors: bool = True) -> None:
        """Wait for every write and the hash `write_async` started (all of them, even after a failure:
        nothing may still write when the blob is aborted), then raise the first failure."""
        pending = [*self._storing, *([self._hashing] if self._hashing is not None else [])]
        self._storing, self._hashing = set(), None
        if pending:
            await asyncio.wait(pending)
        if raise_errors:
            for f in pending:
                f.result()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def seal(self, s) -> str:
        """In the caller's transaction: give the complete bytes their sha256 and return this blob's id,
        or, when identical content is already stored, that blob's id, locked (a concurrent deletion waits
        for the caller's commit, so the reference the caller adds cannot dangle). The caller drops this
        copy with abort() after committing when the returned id is not `self.blob_id`. A file gets its
        final name here, before the caller commits."""
        digest = self.sha256
        # A write first: SQLite then holds its write lock before it reads (no stale snapshot).
        if not repo.set_blob_size(s, self.blob_id, self.size):
            raise BlobSwept(f"blob {self.blob_id} was swept before its seal: its write took longer than "
                            "ADAPTD_BLOB_SWEEP_AFTER_S")
        existing = repo.blob_with_sha256(s, digest)
        if existing is not None and repo.lock_blob(s, existing):
            return existing
        if self._file:
            self._file.seal()
        repo.set_blob_sha256(s, self.blob_id, digest)
        return self.blob_id

    def finish(self, record: Callable[[Session, str], object] | None = None,
               before: Callable[[Session], object] | None = None) -> tuple[str, str, int]:
        """Seal the blob and, in the same transaction, `record(session, blob_id)` the row that references
        it (`before(session)` runs first: e.g. a tenant lock and quota check). Returns (blob_id, sha256,
        size); when the content already exists, the new copy is dropped and the existing blob's id
        returned. `self.recorded` holds what `record` returned."""
        if self._file:  # to disk before the transaction: `before`'s locks are not held while it flushes
            self._file.sync()
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
        """Drop this copy: its row, then (committed) its file."""
        with session_scope(self.db_url) as s:
            repo.delete_blob(s, self.blob_id)
        if self._file:
            self._file.discard()


def blob_file(db_url: str, blob_id: str) -> Path | None:
    """The file holding a blob's bytes; None when they are chunk rows."""
    with session_scope(db_url) as s:
        in_file = repo.blob_in_file(s, blob_id)
    return files.path_of(blob_id) if in_file else None


def iter_blob(db_url: str, blob_id: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Yield the bytes [start, end) of a blob, one chunk row per query or `chunk_bytes` of its file at a
    time (bounded memory)."""
    path = blob_file(db_url, blob_id)
    if path is not None:
        yield from files.read(path, start, end, get_settings().chunk_bytes)
        return
    with session_scope(db_url) as s:
        seq = repo.blob_chunk_at(s, blob_id, start) or 0
    while True:
        with session_scope(db_url) as s:
            row = repo.blob_chunk(s, blob_id, seq)
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
    source = blob_file(db_url, blob_id)
    if source is not None:  # the kernel copies (copy_file_range / sendfile)
        shutil.copyfile(source, path)
        return path.stat().st_size
    n = 0
    with open(path, "wb") as f:
        for data in iter_blob(db_url, blob_id):
            f.write(data)
            n += len(data)
    return n


def delete_blob_if_unreferenced(session, blob_id: str) -> bool:
    """Remove a blob and its chunks or file when no upload or artifact points at it any more (content is
    shared between identical uploads and artifacts). Runs in the caller's transaction, under the blob's
    lock, so an upload that reuses the blob concurrently either commits its reference first (the blob
    stays) or finds it gone (and keeps its own copy). A file goes once the caller has committed."""
    if not repo.lock_blob(session, blob_id) or repo.blob_is_referenced(session, blob_id):
        return False
    if repo.blob_in_file(session, blob_id):
        files.remove_after_commit(session, blob_id)
    repo.delete_blob(session, blob_id)
    return True
