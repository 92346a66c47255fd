"""Reading one indexed image at its offset: a zip entry (inflated within its declared size, CRC
checked) or plain bytes (a tar member, or the spill file), then decoded to pixels. The `Index` is the
compact, picklable description a loader worker process needs; the `Reader` keeps one open file per
process. No torch here (nor in index, limits, layout, decode): only dataset.py feeds torch."""
from __future__ import annotations

import bz2
import lzma
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ...errors import AdaptationError
from .decode import decode_image

COPY_CHUNK = 1024 * 1024


@dataclass
class Index:
    """What a loader worker needs to decode one image."""

    source: str               # file the bytes are read from (the archive, or the spill file)
    kind: str                 # "zip" (local headers, compressed) or "raw" (plain bytes at offset)
    names: list[str]
    offsets: np.ndarray       # int64
    csizes: np.ndarray        # int64
    usizes: np.ndarray        # int64
    methods: np.ndarray       # int16
    crcs: np.ndarray          # uint32
    heights: np.ndarray       # int32, header size of each image
    widths: np.ndarray        # int32
    out_hw: tuple[int, int]   # every decoded image has this size (resized on the CPU if needed)
    channels: int             # 1, 3 or 4
    max_pixels: int
    resize: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per image
    pad: bool = False         # images smaller than out_hw are padded with zeros at the bottom and right


class Reader:
    """Reads and decodes entries. One open file per process (a forked loader worker reopens it)."""

    def __init__(self, index: Index):
        self.index = index
        self._fh = None
        self._pid = -1

    def __getstate__(self):  # spawn-started workers: no file handle travels
        return {"index": self.index, "_fh": None, "_pid": -1}

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.index.source, "rb")  # noqa: SIM115 - kept for the process' lifetime
            self._pid = os.getpid()
        return self._fh

    def read(self, i: int, limit: int | None = None) -> bytes:
        """The entry's uncompressed bytes (the first `limit` bytes when given; then unverified)."""
        ix = self.index
        off, csize, usize = int(ix.offsets[i]), int(ix.csizes[i]), int(ix.usizes[i])
        return read_member(self._file(), ix.kind, off, csize, usize, int(ix.methods[i]), int(ix.crcs[i]),
                           ix.names[i], limit)

    def decode(self, i: int) -> np.ndarray:
        ix = self.index
        name = ix.names[i]
        out_h, out_w = ix.out_hw
        arr = decode_image(name, self.read(i), ix.channels, ix.max_pixels,
                           (out_w, out_h) if ix.resize[i] else None)
        if ix.pad:  # decoded at its own size (its header's), padded by load_batch
            out_h, out_w = int(ix.heights[i]), int(ix.widths[i])
        if arr.shape[:2] != (out_h, out_w):
            raise AdaptationError("mixed_image_sizes", f"{name} decodes to {arr.shape[1]}×{arr.shape[0]}, the "
                                  f"archive's images are {out_w}×{out_h}", {"entry": name})
        return arr

    def load_batch(self, indices: np.ndarray) -> np.ndarray:
        h, w = self.index.out_hw
        alloc = np.zeros if self.index.pad else np.empty
        out = alloc((len(indices), h, w, self.index.channels), dtype=np.uint8)
        for j, i in enumerate(indices):
            arr = self.decode(int(i))
            out[j, :arr.shape[0], :arr.shape[1]] = arr
        return out


def read_member(f, kind: str, off: int, csize: int, usize: int, method: int, crc: int, name: str,
                limit: int | None) -> bytes:
    if kind == "raw":
        f.seek(off)
        want = usize if limit is None else min(limit, usize)
        data = f.read(want)
        if len(data) != want:
            raise AdaptationError("invalid_archive", f"{name!r} is cut short in the archive", {"entry": name})
        return data
    f.seek(_data_start(f, off, name))
    want = usize if limit is None else min(limit, usize)
    if method == zipfile.ZIP_STORED:
        data = f.read(want)
        if len(data) != want:
            raise AdaptationError("invalid_archive", f"{name!r} is cut short in the archive", {"entry": name})
    else:  # a full read asks for one byte more than declared, to catch an entry that lies about its size
        data = b"".join(_inflate(f, csize, want + 1 if limit is None else want, method, name))
    if limit is None:
        _check_whole(name, len(data), zlib.crc32(data), usize, crc)
    return data


def copy_member(f, out, entry) -> None:
    """Write a zip entry's bytes (an index `Entry`) to the file `out`, a chunk at a time, checked as a
    full `read_member` is: for members too large to hold in memory."""
    f.seek(_data_start(f, entry.offset, entry.name))
    if entry.method == zipfile.ZIP_STORED:
        chunks = _stored(f, entry.usize, entry.name)
    else:
        chunks = _inflate(f, entry.csize, entry.usize + 1, entry.method, entry.name)
    size = crc = 0
    for chunk in chunks:
        out.write(chunk)
        size += len(chunk)
        crc = zlib.crc32(chunk, crc)
    _check_whole(entry.name, size, crc, entry.usize, entry.crc)


def _data_start(f, off: int, name: str) -> int:
    """The offset of a zip entry's data, past its local header."""
    f.seek(off)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise AdaptationError("invalid_archive", f"{name!r}: bad zip local header", {"entry": name})
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return off + 30 + name_len + extra_len


def _check_whole(name: str, size: int, crc: int, usize: int, expected_crc: int) -> None:
    if size != usize:
        raise AdaptationError("invalid_archive", f"{name!r} holds {size} bytes, its header says {usize}",
                              {"entry": name})
    if crc != expected_crc:
        raise AdaptationError("invalid_archive", f"{name!r} is corrupt (CRC mismatch)", {"entry": name})


def _stored(f, size: int, name: str) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = f.read(min(COPY_CHUNK, left))
        if not chunk:
            raise AdaptationError("invalid_archive", f"{name!r} is cut short in the archive", {"entry": name})
        left -= len(chunk)
        yield chunk


def _inflate(f, csize: int, max_out: int, method: int, name: str) -> Iterator[bytes]:
    """Decompress at most `max_out` bytes, a piece at a time: an entry that lies about its size cannot
    expand further."""
    left = csize
    if method == zipfile.ZIP_LZMA:  # zip's lzma: 2-byte version, 2-byte props size, props, raw stream
        head = f.read(4)
        psize = struct.unpack("<H", head[2:4])[0] if len(head) == 4 else 0
        props = f.read(psize)
        left -= 4 + psize
        try:
            d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
                lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)])  # as zipfile does
        except (lzma.LZMAError, ValueError, struct.error) as exc:
            raise AdaptationError("invalid_archive", f"{name!r}: bad lzma header: {exc}", {"entry": name}) from None
    elif method == zipfile.ZIP_BZIP2:
        d = bz2.BZ2Decompressor()
    elif method == zipfile.ZIP_DEFLATED:
        d = None
    else:  # pragma: no cover - refused while listing
        raise AdaptationError("unsupported_format", f"zip compression method {method} is not supported")
    produced = 0
    try:
        if d is None:
            z = zlib.decompressobj(-15)
            while produced < max_out and not z.eof:
                if z.unconsumed_tail:
                    chunk = z.unconsumed_tail
                else:
                    chunk = f.read(min(COPY_CHUNK, left)) if left > 0 else b""
                    left -= len(chunk)
                    if not chunk:
                        break
                piece = z.decompress(chunk, max_out - produced)
                produced += len(piece)
                yield piece
        else:
            while produced < max_out and not d.eof:
                if d.needs_input:
                    chunk = f.read(min(COPY_CHUNK, left)) if left > 0 else b""
                    left -= len(chunk)
                    if not chunk:
                        break
                else:
                    chunk = b""
                piece = d.decompress(chunk, max_out - produced)
                produced += len(piece)
                yield piece
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise AdaptationError("invalid_archive", f"{name!r} is corrupt: {exc}", {"entry": name}) from None
