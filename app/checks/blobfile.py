"""A read-only, seekable file over a stored blob, so `zipfile` and the checkpoint sniffers read only the
bytes they need (a zip's central directory, one member's first bytes), one range query at a time; a blob
stored as a file (ADAPTD_BLOB_DIR) is that file, opened."""
from __future__ import annotations

import io

from ..storage import blob_file, iter_blob


class BlobFile(io.RawIOBase):
    def __init__(self, db_url: str, blob_id: str, size: int):
        self.db_url, self.blob_id, self.size, self.pos = db_url, blob_id, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.size, self.pos + len(buffer))
        if end <= self.pos:
            return 0
        data = b"".join(iter_blob(self.db_url, self.blob_id, self.pos, end))
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def open_blob(db_url: str, blob_id: str, size: int) -> io.BufferedReader:
    path = blob_file(db_url, blob_id)
    if path is not None:
        return open(path, "rb", buffering=256 * 1024)
    return io.BufferedReader(BlobFile(db_url, blob_id, size), buffer_size=256 * 1024)
