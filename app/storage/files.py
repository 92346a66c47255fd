"""Blob bytes as content files in ADAPTD_BLOB_DIR (embedded mode: `home`/blobs), a folder the API and
every worker share (app/storage/blobs.py decides which blobs; their rows stay in the database). A file
is written under `tmp/`, flushed to disk and renamed to its final name before the seal commits, so a
committed blob never points at a missing file; it is removed only after the transaction that deletes
its row has committed, so a crash leaves at most an orphan file, never a row without its bytes. File
names are the blob's server-made uuid in hex (`<2 hex>/<32 hex>`), never anything a client sent.

Whole aligned chunks are written with O_DIRECT where the filesystem takes it: the bytes go from a reused,
page-aligned buffer to the disk without passing through the page cache, which a blob written once and read
later by one worker would only fill (on the dev VM, buffered writes into fresh page-cache pages cost 2.6–2.9
CPU s/GiB: BENCHMARKS.md, Uploads). A chunk that is not aligned (the last one, an odd ADAPTD_CHUNK_BYTES)
goes through the page cache; the seal's fsync covers both."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.orm import Session

from ..config import get_settings

log = logging.getLogger(__name__)

_DOOMED = "adaptd.blob_files_after_commit"  # session.info key: files to remove once the session commits
TMP = "tmp"  # files being written (and /readyz's probe) live in this subfolder


def root() -> Path | None:
    """The blob folder new blobs are written to; None: chunk rows."""
    return get_settings().resolved_blob_dir


def path_of(blob_id: str) -> Path:
    """The final file of a blob stored as a file."""
    folder = root()
    if folder is None:
        raise RuntimeError(f"blob {blob_id} is stored as a file but this process has no blob folder "
                           "(ADAPTD_BLOB_DIR)")
    return path_in(folder, blob_id)


def path_in(folder: Path, blob_id: str) -> Path:
    """`<2 hex>/<32 hex>` under `folder` (uuid.UUID refuses anything but a uuid: no traversal)."""
    name = uuid.UUID(blob_id).hex
    return folder / name[:2] / name


def temp_of(final: Path) -> Path:
    """The name a blob's file is written under until its seal: `tmp/<32 hex>`."""
    return final.parent.parent / TMP / final.name


ALIGN = 4096  # O_DIRECT's alignment of buffer, file offset and length (a page: 512- and 4096-byte sectors)


class _AlignedBuffers:
    """Page-aligned buffers (anonymous mmap) for O_DIRECT writes, reused from write to write: memory stays
    at one buffer per write in flight, and its pages stay mapped (never fresh ones)."""

    KEEP = 8

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextmanager
    def take(self, size: int):
        with self._lock:
            buf = next((b for b in self._free if len(b) >= size), None)
            if buf is not None:
                self._free.remove(buf)
        if buf is None:
            buf = mmap.mmap(-1, -(-size // ALIGN) * ALIGN)
        try:
            yield buf
        finally:
            with self._lock:
                if len(self._free) < self.KEEP:
                    self._free.append(buf)
                else:
                    buf.close()


_BUFFERS = _AlignedBuffers()


class ContentFile:
    """One blob's file while it is written: each chunk lands at its offset (pwrite), so several writes
    may be in flight at once; aligned chunks through a second, O_DIRECT descriptor where the filesystem
    accepts one."""

    def __init__(self, blob_id: str):
        self.final = path_of(blob_id)
        self.tmp = temp_of(self.final)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self._direct: int | None = None
        self._direct_refused = False  # the filesystem took the descriptor but refused a write
        if hasattr(os, "O_DIRECT"):
            try:
                self._direct = os.open(self.tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as exc:  # tmpfs and some others refuse it: the page cache for every chunk
                if exc.errno != errno.EINVAL:
                    os.close(self._fd)
                    self.tmp.unlink(missing_ok=True)
                    raise
        self.direct_supported = self._direct is not None
        self.direct_bytes = 0  # written past the page cache (tests, benchmarks)
        self._synced = False

    def store(self, offset: int, data: bytes) -> None:
        n = len(data)
        if self._direct is not None and not self._direct_refused and offset % ALIGN == 0 and n % ALIGN == 0 and n:
            with _BUFFERS.take(n) as buf:
                buf[:n] = data
                try:
                    done = os.pwrite(self._direct, memoryview(buf)[:n], offset)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct_refused, done = True, 0  # the page cache from now on
            self.direct_bytes += done
            offset, data = offset + done, memoryview(data)[done:]
        _pwrite_all(self._fd, data, offset)

    def sync(self) -> None:
        """Flush the bytes to disk (once): the page cache's and the file's metadata (O_DIRECT's too)."""
        if self._fd is not None and not self._synced:
            os.fsync(self._fd)
            self._synced = True

    def _close(self) -> None:
        for fd in (self._fd, self._direct):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct = None

    def seal(self) -> None:
        """Flush the bytes to disk and give the file its final name (again: a no-op)."""
        if self._fd is None:
            return
        self.sync()
        self._close()
        self.final.parent.mkdir(exist_ok=True)
        os.replace(self.tmp, self.final)
        _fsync_folder(self.final.parent)

    def discard(self) -> None:
        """Remove the file, written or sealed (after its row's deletion has committed)."""
        self._close()
        self.tmp.unlink(missing_ok=True)
        self.final.unlink(missing_ok=True)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path, start: int, end: int | None, piece: int) -> Iterator[bytes]:
    """The bytes [start, end) of a file, `piece` bytes at a time."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            data = f.read(piece if left is None else min(piece, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def remove_after_commit(session: Session, blob_id: str) -> None:
    """Remove the blob's file, sealed or still under tmp/, once `session` commits (kept if it rolls back)."""
    if not event.contains(session, "after_commit", _remove_doomed):
        event.listen(session, "after_commit", _remove_doomed)
        event.listen(session, "after_rollback", _forget_doomed)
    final = path_of(blob_id)
    session.info.setdefault(_DOOMED, []).extend((final, temp_of(final)))


def _remove_doomed(session: Session) -> None:
    for path in session.info.pop(_DOOMED, ()):
        try:
            path.unlink(missing_ok=True)
        except OSError:  # the row is gone already: an orphan file, not an error for the caller
            log.exception("could not remove blob file %s", path)


def _forget_doomed(session: Session) -> None:
    session.info.pop(_DOOMED, None)


def old_temp_files(folder: Path, older_than_s: float) -> list[Path]:
    """Files under `tmp/` not written to for `older_than_s` (a live writer's file is younger: each write
    moves its mtime)."""
    return _old_files(folder / TMP, time.time() - older_than_s)


def old_final_files(folder: Path, older_than_s: float, batch: int) -> Iterator[dict[str, Path]]:
    """{blob id: path} of the final files older than `older_than_s`, at most `batch` at a time, one
    `<2 hex>` subfolder listed at a time (names that are not a blob's are left alone)."""
    cutoff, found = time.time() - older_than_s, {}
    for sub in sorted(os.scandir(folder), key=lambda e: e.name):
        if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
            continue
        for path in _old_files(Path(sub.path), cutoff):
            try:
                blob_id = str(uuid.UUID(hex=path.name))
            except ValueError:
                continue
            if path == path_in(folder, blob_id):  # the canonical name, in its own subfolder
                found[blob_id] = path
            if len(found) == batch:
                yield found
                found = {}
    if found:
        yield found


def _old_files(folder: Path, cutoff: float) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    old = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                old.append(Path(entry.path))
        except FileNotFoundError:  # removed meanwhile (a seal's rename, a deletion)
            continue
    return old


def check_writable(folder: Path) -> str:
    """/readyz: "ok" when a file can be created and removed under `folder`/tmp (created as a writer
    would create it), else "error: <why>". The reason names no path (the probe is unauthenticated)."""
    try:
        (folder / TMP).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is not a folder" if folder.exists() and not folder.is_dir() else "is missing and cannot be created"
        return f"error: the blob folder (ADAPTD_BLOB_DIR) {what} ({type(exc).__name__})"
    probe = folder / TMP / f"readyz-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640))
        probe.unlink()
    except OSError as exc:
        return f"error: the blob folder (ADAPTD_BLOB_DIR) is not writable ({type(exc).__name__}: {exc.strerror})"
    return "ok"
