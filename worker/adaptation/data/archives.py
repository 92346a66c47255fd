"""Image archives: `zip` and `tar` (plain or gzip) of PNG, JPEG or WebP files, flat or one folder per class.

Safety (DESIGN §5): an archive is read entry by entry and no path from it is ever joined onto the
filesystem (names are only validated, sorted and turned into labels). Before any pixel is decoded the
archive is indexed once: entry count, total uncompressed size, per-entry and total compression ratio
(zip bombs, overlapping zip entries), path traversal, links and devices, and every image's header
(format, size, mode) are checked, so a bad archive fails fast with a precise code. Pixels are decoded
lazily, one batch at a time, by a torch DataLoader (worker processes optional): memory stays bounded
by the batches in flight, whatever the number of images.

Random access: zip entries and plain-tar members are read at their offsets in the archive. A gzip
stream cannot be seeked, so a `.tar.gz` is decompressed once, while indexing and within the same
limits, into a temporary spill file holding only the image bytes (deleted with the set).
"""
from __future__ import annotations

import bz2
import io
import lzma
import os
import re
import stat
import struct
import tarfile
import tempfile
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..errors import AdaptationError
from . import limits as L

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
PEEK_BYTES = 64 * 1024           # bytes read to parse an image header while indexing
COPY_CHUNK = 1024 * 1024
IGNORED_DIRS = ("__MACOSX",)
IGNORED_FILES = ("Thumbs.db", "desktop.ini")
MIN_BATCHES_FOR_WORKERS = 4      # fewer batches than this: decode in-process (worker start-up costs more)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_OTHER_IMAGE_MAGIC = (  # recognised only to say "this image format is not accepted"
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"),
    (b"P5", "PNM"), (b"P6", "PNM"), (b"qoif", "QOI"),
)
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1, "F": 1,
                  "RGB": 3, "RGBX": 3, "RGBa": 3, "CMYK": 3, "YCbCr": 3, "LAB": 3, "HSV": 3, "PA": 3,
                  "RGBA": 4}
_CHANNEL_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


def _default_workers() -> int:
    env = os.environ.get("ADAPTD_LOADER_WORKERS")
    if env is not None and env.strip() != "":
        try:
            return max(0, int(env))
        except ValueError:
            raise AdaptationError("invalid_configuration",
                                  f"ADAPTD_LOADER_WORKERS must be an integer, got {env!r}") from None
    return min(4, max(0, (os.cpu_count() or 1) - 1))


# --- the index --------------------------------------------------------------------------------------

@dataclass
class _Entry:
    """One candidate image entry found while listing the archive."""

    name: str                 # normalised path inside the archive ("a/b.png"), never used as a file path
    offset: int               # zip: local header offset; raw: first data byte
    csize: int                # bytes stored in the file
    usize: int                # uncompressed bytes
    method: int = 0           # zip compression method (0 for raw)
    crc: int = 0
    dims: tuple[int, int, int] | None = None  # (width, height, channels) when probed while listing


@dataclass
class _Index:
    """Compact, picklable description of the images: what a loader worker needs to decode one."""

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


class _Reader:
    """Reads and decodes entries. One open file per process (a forked loader worker reopens it)."""

    def __init__(self, index: _Index):
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

    # raw bytes ---------------------------------------------------------------------------------
    def read(self, i: int, limit: int | None = None) -> bytes:
        """The entry's uncompressed bytes (the first `limit` bytes when given; then unverified)."""
        ix = self.index
        off, csize, usize = int(ix.offsets[i]), int(ix.csizes[i]), int(ix.usizes[i])
        return _read_member(self._file(), ix.kind, off, csize, usize, int(ix.methods[i]), int(ix.crcs[i]),
                            ix.names[i], limit)

    # decoding ----------------------------------------------------------------------------------
    def decode(self, i: int) -> np.ndarray:
        ix = self.index
        name = ix.names[i]
        data = self.read(i)
        out_h, out_w = ix.out_hw
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                if bool(ix.resize[i]) and im.format == "JPEG":
                    im.draft(im.mode, (out_w, out_h))  # DCT-domain downscale: decodes big JPEGs faster
                im.load()
                if im.size[0] * im.size[1] > ix.max_pixels:
                    raise _too_large(name, im.size, ix.max_pixels)
                arr = _to_array(im, ix.channels, (out_w, out_h) if ix.resize[i] else None)
        except AdaptationError:
            raise
        except Image.DecompressionBombError as exc:
            raise AdaptationError("image_too_large", f"{name}: {exc}", {"entry": name}) from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the input's fault
            raise _undecodable(name, data, exc) from None
        if arr.shape[:2] != (out_h, out_w):
            raise AdaptationError("mixed_image_sizes", f"{name} decodes to {arr.shape[1]}×{arr.shape[0]}, the "
                                  f"archive's images are {out_w}×{out_h}", {"entry": name})
        return arr

    def load_batch(self, indices: np.ndarray) -> torch.Tensor:
        h, w = self.index.out_hw
        out = np.empty((len(indices), h, w, self.index.channels), dtype=np.uint8)
        for j, i in enumerate(indices):
            out[j] = self.decode(int(i))
        return torch.from_numpy(out)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: `ds[array_of_indices]` -> ("ok", uint8 NHWC).

    Errors come back as values, not exceptions: the DataLoader cannot re-raise an AdaptationError
    (it rebuilds exceptions from a message only), and the code must survive the trip."""

    def __init__(self, reader: _Reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.index.names)

    def __getitem__(self, indices):
        try:
            return ("ok", self.reader.load_batch(np.asarray(indices)))
        except AdaptationError as exc:
            return ("error", exc.code, exc.message, exc.detail)


def _identity(x):
    return x


# --- the public set ---------------------------------------------------------------------------------

class ArchiveImageSet:
    """An ImageSet over a zip or tar(.gz) archive of PNG/JPEG/WebP images.

    `preprocess_size`: the job's square input size; images of different sizes are resized to it on the
    CPU (Pillow, bilinear with antialiasing) so batches stack. Without it, mixed sizes are refused.
    Same-size images are returned as stored (the device resizes batches)."""

    def __init__(self, path: Path | str, fmt: str | None = None, *, preprocess_size: int | None = None,
                 num_workers: int | None = None, prefetch_factor: int = 2, pin_memory: bool = False,
                 multiprocessing_context: str | None = None,
                 max_entries: int = L.MAX_ENTRIES, max_total_bytes: int = L.MAX_TOTAL_BYTES,
                 max_entry_bytes: int = L.MAX_ENTRY_BYTES, max_ratio: float = L.MAX_RATIO,
                 ratio_min_bytes: int = L.RATIO_MIN_BYTES,
                 max_pixels: int | None = None, spill_dir: str | None = None):
        self.path = Path(path)
        self.format = fmt or _detect_archive(self.path)
        if self.format not in ("zip", "tar"):
            raise AdaptationError("unsupported_format", f"not an image archive format: {self.format!r}")
        if preprocess_size is not None and int(preprocess_size) <= 0:
            raise AdaptationError("invalid_preprocess", f"preprocess size must be positive, got {preprocess_size}")
        self.preprocess_size = preprocess_size
        self.num_workers = _default_workers() if num_workers is None else max(0, int(num_workers))
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.limits = {"max_entries": max_entries, "max_total_bytes": max_total_bytes,
                       "max_entry_bytes": max_entry_bytes, "max_ratio": max_ratio,
                       "ratio_min_bytes": ratio_min_bytes}
        # Pillow's own decompression-bomb guard stays on; this limit also holds if someone disabled it.
        self.max_pixels = int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485)
        self.notes: list[str] = []
        self._spill: str | None = None
        self._finalizer = None

        if self.format == "zip":
            entries, ignored = self._list_zip()
            kind, source = "zip", str(self.path)
        else:
            entries, ignored = self._list_tar(spill_dir)
            kind, source = "raw", self._spill or str(self.path)
        try:
            self._build(entries, ignored, kind, source)
        except BaseException:
            self.close_spill()
            raise

    # -- ImageSet protocol --
    def __len__(self) -> int:
        return len(self._index.names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every decoded image."""
        return self._index.out_hw

    @property
    def channels(self) -> int:
        return self._index.channels

    @property
    def names(self) -> list[str]:
        return list(self._index.names)

    def batches(self, batch_size: int, order: np.ndarray | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        idx = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError("order holds indices outside the set")
        chunks = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
        workers = self.num_workers if len(chunks) >= MIN_BATCHES_FOR_WORKERS else 0
        if workers == 0:
            for chunk in chunks:
                yield self._reader.load_batch(chunk), torch.from_numpy(chunk)
            return
        yield from self._batches_with_workers(chunks, workers)

    def _batches_with_workers(self, chunks: list[np.ndarray], workers: int):
        loader = torch.utils.data.DataLoader(
            _BatchDataset(self._reader), batch_size=None, sampler=chunks, num_workers=workers,
            collate_fn=_identity, prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context, persistent_workers=False)
        try:
            it = iter(loader)
        except AssertionError as exc:  # e.g. "daemonic processes are not allowed to have children"
            self.notes.append(f"loader workers unavailable ({exc}); decoding in-process")
            self.num_workers = 0
            for chunk in chunks:
                yield self._reader.load_batch(chunk), torch.from_numpy(chunk)
            return
        try:
            for chunk in chunks:
                try:
                    result = next(it)
                except RuntimeError as exc:
                    if "DataLoader worker" in str(exc):
                        raise AdaptationError("loader_worker_died", "an image-decoding worker process died "
                                              f"(a decoder crash or the memory limit): {exc}") from None
                    raise
                if result[0] == "error":
                    _, code, message, detail = result
                    raise AdaptationError(code, message, detail)
                yield result[1], torch.from_numpy(chunk)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del it

    def close(self) -> None:
        self._reader.close()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- listing --
    def _list_zip(self) -> tuple[list[_Entry], int]:
        lim = self.limits
        archive_size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                endrec = zipfile._EndRecData(f)  # the entry count, read before parsing the directory
        except Exception:  # noqa: BLE001 - fall through: ZipFile reports the problem below
            endrec = None
        if endrec and endrec[zipfile._ECD_ENTRIES_TOTAL] > lim["max_entries"]:
            raise _too_many(endrec[zipfile._ECD_ENTRIES_TOTAL], lim["max_entries"])
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise AdaptationError("invalid_archive", f"not a readable zip archive: {exc}") from None
        if len(infos) > lim["max_entries"]:
            raise _too_many(len(infos), lim["max_entries"])

        total_u = 0
        spans = []  # (offset, end) of every entry's bytes: overlapping entries are a known zip bomb
        entries: list[_Entry] = []
        ignored = 0
        for info in infos:
            name = _normalise(info.filename)
            mode = (info.external_attr >> 16) & 0xFFFF
            if mode and (stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)
                         or stat.S_ISSOCK(mode)):
                raise AdaptationError("archive_symlink", f"the archive holds a link or device entry: {info.filename!r}"
                                      "; only regular files are read", {"entry": info.filename})
            total_u += info.file_size
            spans.append((info.header_offset, info.header_offset + 30 + info.compress_size, info.filename))
            if total_u > lim["max_total_bytes"]:
                raise _too_large_total(total_u, lim["max_total_bytes"])
            if info.is_dir() or name == "":
                continue
            if _ignored(name):
                ignored += 1
                continue
            if info.flag_bits & 0x1:
                raise AdaptationError("archive_encrypted", f"{info.filename!r} is encrypted; upload an unencrypted "
                                      "archive", {"entry": info.filename})
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                          zipfile.ZIP_LZMA):
                raise AdaptationError("unsupported_format", f"{info.filename!r} uses zip compression method "
                                      f"{info.compress_type}; supported: stored, deflate, bzip2, lzma",
                                      {"entry": info.filename, "method": info.compress_type})
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise AdaptationError("invalid_archive", f"{info.filename!r} is stored uncompressed but its sizes "
                                      "disagree", {"entry": info.filename})
            self._check_entry(info.filename, info.file_size, info.compress_size)
            entries.append(_Entry(name, info.header_offset, info.compress_size, info.file_size,
                                  info.compress_type, info.CRC))
        spans.sort()
        for (start, end, a), (nstart, _, b) in zip(spans, spans[1:]):
            if end > nstart:
                raise AdaptationError("archive_compression_ratio", "the archive's entries overlap (a zip-bomb "
                                      f"construction): {a!r} and {b!r}", {"entries": [a, b]})
        if spans and spans[-1][1] > archive_size:
            raise AdaptationError("invalid_archive", f"the zip archive is truncated ({spans[-1][2]!r} runs past "
                                  "its end)", {"entry": spans[-1][2]})
        self._check_total_ratio(total_u, archive_size)
        return entries, ignored

    def _list_tar(self, spill_dir: str | None) -> tuple[list[_Entry], int]:
        with open(self.path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        return self._list_tar_gz(spill_dir) if gz else self._list_tar_plain()

    def _tar_member(self, m: tarfile.TarInfo, count: int, total_u: int) -> str | None:
        """Checks one member; returns its normalised name when it is a candidate image."""
        lim = self.limits
        if count > lim["max_entries"]:
            raise _too_many(count, lim["max_entries"], at_least=True)
        name = _normalise(m.name)
        if m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo():
            raise AdaptationError("archive_symlink", f"the archive holds a link or device entry: {m.name!r}; only "
                                  "regular files are read", {"entry": m.name})
        if total_u > lim["max_total_bytes"]:
            raise _too_large_total(total_u, lim["max_total_bytes"])
        if m.isdir() or name == "":
            return None
        if not m.isreg() or m.issparse():
            raise AdaptationError("invalid_archive", f"{m.name!r} is not a regular file (tar type {m.type!r})",
                                  {"entry": m.name})
        return name

    def _list_tar_plain(self) -> tuple[list[_Entry], int]:
        entries: list[_Entry] = []
        ignored = count = total_u = 0
        archive_size = self.path.stat().st_size
        try:
            with tarfile.open(self.path, mode="r:") as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    tf.members.clear()  # keep memory flat on huge archives: we hold our own index
                    count += 1
                    total_u += m.size
                    name = self._tar_member(m, count, total_u)
                    if name is None:
                        continue
                    if _ignored(name):
                        ignored += 1
                        continue
                    self._check_entry(m.name, m.size, m.size)
                    if m.offset_data + m.size > archive_size:
                        raise AdaptationError("invalid_archive", f"the tar archive is truncated ({m.name!r} runs "
                                              "past its end)", {"entry": m.name})
                    entries.append(_Entry(name, m.offset_data, m.size, m.size))
        except AdaptationError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
            raise AdaptationError("invalid_archive", f"not a readable tar archive: {exc}") from None
        return entries, ignored

    def _list_tar_gz(self, spill_dir: str | None) -> tuple[list[_Entry], int]:
        lim = self.limits
        fd, spill = tempfile.mkstemp(prefix="adaptd-archive-", suffix=".spill", dir=spill_dir)
        self._spill = spill
        self._finalizer = weakref.finalize(self, _remove_spill, spill, os.getpid())
        entries: list[_Entry] = []
        ignored = count = total_u = 0
        raw = _CountingReader(open(self.path, "rb"))  # noqa: SIM115 - closed below
        try:
            with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=raw, mode="r|gz") as tf:
                for m in tf:
                    tf.members.clear()
                    count += 1
                    total_u += m.size
                    name = self._tar_member(m, count, total_u)
                    if name is None:
                        continue
                    if _ignored(name):
                        ignored += 1
                        continue
                    if m.size > lim["max_entry_bytes"]:
                        raise _entry_too_large(m.name, m.size, lim["max_entry_bytes"])
                    src = tf.extractfile(m)
                    start, head, done = out.tell(), b"", 0  # only the header bytes are kept in memory
                    while done < m.size:
                        chunk = src.read(min(COPY_CHUNK, m.size - done))
                        if not chunk:
                            raise AdaptationError("invalid_archive", f"the tar.gz archive is truncated inside "
                                                  f"{m.name!r}", {"entry": m.name})
                        if len(head) < PEEK_BYTES:
                            head += chunk[:PEEK_BYTES - len(head)]
                        out.write(chunk)
                        done += len(chunk)
                        self._check_stream_ratio(m.offset_data + done, raw.count, m.name)
                    self._check_stream_ratio(m.offset_data + m.size, raw.count, m.name)
                    dims = _probe_image(name, head, m.size, lambda: _read_back(out, spill, start, m.size),
                                        self.max_pixels)
                    entries.append(_Entry(name, start, m.size, m.size, dims=dims))
        except AdaptationError:
            self.close_spill()
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, UnicodeDecodeError) as exc:
            self.close_spill()
            raise AdaptationError("invalid_archive", f"not a readable tar.gz archive: {exc}") from None
        finally:
            raw.close()
        return entries, ignored

    def close_spill(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def _check_entry(self, name: str, usize: int, csize: int) -> None:
        lim = self.limits
        if usize > lim["max_entry_bytes"]:
            raise _entry_too_large(name, usize, lim["max_entry_bytes"])
        if usize > lim["ratio_min_bytes"] and usize > lim["max_ratio"] * max(csize, 1):
            raise AdaptationError(
                "archive_compression_ratio",
                f"{name!r} expands {usize / max(csize, 1):.0f}× (limit {lim['max_ratio']:.0f}×): a zip bomb?",
                {"entry": name, "uncompressed_bytes": usize, "compressed_bytes": csize,
                 "max_ratio": lim["max_ratio"]})

    def _check_total_ratio(self, total_u: int, archive_bytes: int) -> None:
        lim = self.limits
        if total_u > lim["ratio_min_bytes"] and total_u > lim["max_ratio"] * max(archive_bytes, 1):
            raise AdaptationError(
                "archive_compression_ratio",
                f"the archive expands {total_u / max(archive_bytes, 1):.0f}× in total (limit "
                f"{lim['max_ratio']:.0f}×): a zip bomb?",
                {"uncompressed_bytes": total_u, "archive_bytes": archive_bytes, "max_ratio": lim["max_ratio"]})

    def _check_stream_ratio(self, total_u: int, consumed: int, name: str) -> None:
        lim = self.limits
        if total_u > lim["max_total_bytes"]:
            raise _too_large_total(total_u, lim["max_total_bytes"])
        self._check_total_ratio(total_u, consumed)

    # -- index --
    def _build(self, entries: list[_Entry], ignored: int, kind: str, source: str) -> None:
        if ignored:
            self.notes.append(f"ignored {ignored} entries (__MACOSX/, dotfiles, Thumbs.db, desktop.ini)")
        if not entries:
            self.close_spill()
            raise AdaptationError("empty_archive", "the archive holds no images"
                                  + (f" ({ignored} ignored entries: __MACOSX/, dotfiles)" if ignored else ""),
                                  {"ignored_entries": ignored})
        names = [e.name for e in entries]
        dupes = _duplicates(names)
        if dupes:
            raise AdaptationError("archive_duplicate_entry", f"the archive holds {len(dupes)} paths more than once",
                                  {"entries": dupes[:20]})
        entries.sort(key=lambda e: e.name)
        names, labels, class_names = self._layout([e.name for e in entries])
        n = len(entries)
        index = _Index(
            source=source, kind=kind, names=names,
            offsets=np.fromiter((e.offset for e in entries), np.int64, n),
            csizes=np.fromiter((e.csize for e in entries), np.int64, n),
            usizes=np.fromiter((e.usize for e in entries), np.int64, n),
            methods=np.fromiter((e.method for e in entries), np.int16, n),
            crcs=np.fromiter((e.crc for e in entries), np.uint32, n),
            heights=np.zeros(n, np.int32), widths=np.zeros(n, np.int32),
            out_hw=(0, 0), channels=0, max_pixels=self.max_pixels)
        self._reader = _Reader(index)
        channels = np.zeros(n, np.int8)
        try:
            for i, e in enumerate(entries):
                w, h, c = e.dims or _probe_image(names[i], self._reader.read(i, limit=PEEK_BYTES), e.usize,
                                                 lambda i=i: self._reader.read(i), self.max_pixels)
                index.widths[i], index.heights[i], channels[i] = w, h, c
        finally:
            self._reader.close()
        sizes = set(zip(index.heights.tolist(), index.widths.tolist()))
        if len(sizes) == 1:
            index.out_hw = sizes.pop()
            index.resize = np.zeros(n, dtype=bool)
        elif self.preprocess_size is None:
            examples = {}
            for i in range(n):
                examples.setdefault(f"{index.widths[i]}x{index.heights[i]}", names[i])
                if len(examples) >= 5:
                    break
            raise AdaptationError("mixed_image_sizes",
                                  f"the archive's images have {len(sizes)} different sizes; set preprocess.size so "
                                  "they can be resized to one", {"examples": examples, "sizes": len(sizes)})
        else:
            s = int(self.preprocess_size)
            index.out_hw = (s, s)
            index.resize = (index.heights != s) | (index.widths != s)
            self.notes.append(f"{len(sizes)} image sizes: {int(index.resize.sum())} images are resized to {s}×{s} "
                              "on the CPU while loading")
        present = sorted(set(channels.tolist()))
        index.channels = max(present)
        if len(present) > 1:
            self.notes.append(f"mixed channel counts {present}: every image is converted to "
                              f"{_CHANNEL_MODE[index.channels]}")
        self._index = index
        self.labels = labels
        self.class_names = class_names

    def _layout(self, names: list[str]) -> tuple[list[str], np.ndarray | None, list[str] | None]:
        parts = [n.split("/") for n in names]
        strip = 0
        while all(len(p) > strip + 1 for p in parts) and len({p[strip] for p in parts}) == 1:
            strip += 1
        if strip:
            self.notes.append(f"common top-level folder {'/'.join(parts[0][:strip])!r} treated as a wrapper "
                              "(a labelled archive has at least two class folders)")
        depths = {len(p) - strip for p in parts}
        if depths == {1}:
            return names, None, None
        if depths == {2}:
            class_names = sorted({p[strip] for p in parts})
            lookup = {c: k for k, c in enumerate(class_names)}
            labels = np.fromiter((lookup[p[strip]] for p in parts), np.int64, len(parts))
            if all(c.isdigit() for c in class_names) and class_names != sorted(class_names, key=int):
                self.notes.append("class folders are numbers, ordered as text (like torchvision's ImageFolder): "
                                  f"{class_names[:4]}...; see class_names for the label of each folder")
            return names, labels, class_names
        flat = [n for p, n in zip(parts, names) if len(p) - strip == 1][:3]
        nested = [n for p, n in zip(parts, names) if len(p) - strip > 2][:3]
        raise AdaptationError("invalid_archive_layout",
                              "an image archive is either flat (images at the top level) or holds one folder per "
                              "class with the images directly inside",
                              {"top_level_examples": flat, "nested_examples": nested,
                               "depths": sorted(d for d in depths)})


# --- helpers ----------------------------------------------------------------------------------------

class _CountingReader:
    """Counts the compressed bytes tarfile pulls from the archive (for the running ratio check)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.count += len(b)
        return b

    def close(self) -> None:
        self.f.close()


def _probe_image(name: str, data: bytes, usize: int, read_full, max_pixels: int) -> tuple[int, int, int]:
    """Parse an image header without decoding pixels: (width, height, channels). `data` holds the
    entry's first bytes; `read_full()` returns all of them, for headers longer than that."""
    for attempt in range(2):
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                w, h = im.size
                c = _mode_channels(im)
            break
        except Image.DecompressionBombError as exc:
            raise AdaptationError("image_too_large", f"{name}: {exc}", {"entry": name}) from None
        except AdaptationError as exc:
            exc.detail.setdefault("entry", name)
            raise
        except Exception as exc:  # noqa: BLE001 - any parse failure is the input's fault
            if attempt == 0 and len(data) < usize:  # the header runs past the peeked bytes
                data = read_full()
                continue
            raise _undecodable(name, data, exc) from None
    if w * h > max_pixels:
        raise _too_large(name, (w, h), max_pixels)
    if w < 1 or h < 1:
        raise AdaptationError("not_an_image", f"{name} has no pixels ({w}×{h})", {"entry": name})
    return w, h, c


def _read_back(out, path: str, start: int, size: int) -> bytes:
    out.flush()
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


def _remove_spill(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked loader worker must never delete its parent's spill file
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _detect_archive(path: Path) -> str:
    from .images import detect_format

    return detect_format(path)


def _normalise(raw: str) -> str:
    """Validate an archive path and return it as 'a/b/c' (it is never used as a filesystem path)."""
    name = raw.replace("\\", "/")
    if "\x00" in name or name.startswith("/") or _WINDOWS_DRIVE.match(name):
        raise AdaptationError("archive_path_traversal", f"absolute path in the archive: {raw!r}", {"entry": raw})
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdaptationError("archive_path_traversal", f"'..' in an archive path: {raw!r}", {"entry": raw})
    return "/".join(parts)


def _ignored(name: str) -> bool:
    parts = name.split("/")
    return (any(p in IGNORED_DIRS or p.startswith(".") for p in parts) or parts[-1] in IGNORED_FILES)


def _duplicates(names: list[str]) -> list[str]:
    seen, dupes = set(), []
    for n in names:
        if n in seen:
            dupes.append(n)
        seen.add(n)
    return dupes


def _mode_channels(im: Image.Image) -> int:
    mode = im.mode
    if mode == "P":
        return 4 if "transparency" in im.info else 3
    try:
        return _MODE_CHANNELS[mode]
    except KeyError:
        raise AdaptationError("not_an_image", f"unsupported image mode {mode!r}", {"mode": mode}) from None


def _to_array(im: Image.Image, channels: int, resize_to: tuple[int, int] | None) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top 8 bits
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    target = _CHANNEL_MODE[channels]
    if im.mode != target:
        if im.mode == "LA" and target == "L":
            im = im.getchannel(0)
        else:
            im = im.convert(target)
    if resize_to is not None and im.size != resize_to:
        im = im.resize(resize_to, Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _read_member(f, kind: str, off: int, csize: int, usize: int, method: int, crc: int, name: str,
                 limit: int | None) -> bytes:
    if kind == "raw":
        f.seek(off)
        want = usize if limit is None else min(limit, usize)
        data = f.read(want)
        if len(data) != want:
            raise AdaptationError("invalid_archive", f"{name!r} is cut short in the archive", {"entry": name})
        return data
    f.seek(off)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise AdaptationError("invalid_archive", f"{name!r}: bad zip local header", {"entry": name})
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(off + 30 + name_len + extra_len)
    want = usize if limit is None else min(limit, usize)
    if method == zipfile.ZIP_STORED:
        data = f.read(want)
        if len(data) != want:
            raise AdaptationError("invalid_archive", f"{name!r} is cut short in the archive", {"entry": name})
    else:  # a full read asks for one byte more than declared, to catch an entry that lies about its size
        data = _inflate(f, csize, want + 1 if limit is None else want, method, name)
    if limit is None:
        if len(data) != usize:
            raise AdaptationError("invalid_archive", f"{name!r} holds {len(data)} bytes, its header says {usize}",
                                  {"entry": name})
        if zlib.crc32(data) != crc:
            raise AdaptationError("invalid_archive", f"{name!r} is corrupt (CRC mismatch)", {"entry": name})
    return data


def _inflate(f, csize: int, max_out: int, method: int, name: str) -> bytes:
    """Decompress at most `max_out` bytes: an entry that lies about its size cannot expand further."""
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
    out = bytearray()
    try:
        if d is None:
            z = zlib.decompressobj(-15)
            while len(out) < max_out and not z.eof:
                if z.unconsumed_tail:
                    chunk = z.unconsumed_tail
                else:
                    chunk = f.read(min(COPY_CHUNK, left)) if left > 0 else b""
                    left -= len(chunk)
                    if not chunk:
                        break
                out += z.decompress(chunk, max_out - len(out))
        else:
            while len(out) < max_out and not d.eof:
                if d.needs_input:
                    chunk = f.read(min(COPY_CHUNK, left)) if left > 0 else b""
                    left -= len(chunk)
                    if not chunk:
                        break
                else:
                    chunk = b""
                out += d.decompress(chunk, max_out - len(out))
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise AdaptationError("invalid_archive", f"{name!r} is corrupt: {exc}", {"entry": name}) from None
    return bytes(out)


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, fmt: str) -> bool:
    if fmt == "PNG":
        return b"IEND" not in data[-16:]
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "WEBP":
        return len(data) < 12 or struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    return False


def _undecodable(name: str, data: bytes, exc: Exception) -> AdaptationError:
    fmt = _sniff(data)
    reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    if fmt is not None:
        if "truncat" in str(exc).lower() or _looks_truncated(data, fmt):
            return AdaptationError("truncated_image", f"{name} is a truncated {fmt} file", {"entry": name,
                                   "format": fmt, "reason": reason})
        return AdaptationError("corrupt_image", f"{name} is a {fmt} file that cannot be decoded: {reason}",
                               {"entry": name, "format": fmt, "reason": reason})
    other = next((f for magic, f in _OTHER_IMAGE_MAGIC if data.startswith(magic)), None)
    if other is not None:
        return AdaptationError("unsupported_image_format", f"{name} is a {other} image; archives may hold PNG, "
                               "JPEG or WebP", {"entry": name, "format": other})
    return AdaptationError("not_an_image", f"{name} is not a PNG, JPEG or WebP image (__MACOSX/ and dotfiles are "
                           "ignored; anything else in the archive must be an image)", {"entry": name})


def _too_many(count: int, limit: int, at_least: bool = False) -> AdaptationError:
    return AdaptationError("archive_too_many_entries", f"the archive holds {'more than ' if at_least else ''}"
                           f"{limit if at_least else count} entries (limit {limit})",
                           {"entries": count, "max_entries": limit})


def _too_large_total(total: int, limit: int) -> AdaptationError:
    return AdaptationError("archive_too_large", f"the archive expands to more than {limit} bytes",
                           {"uncompressed_bytes_at_least": total, "max_total_bytes": limit})


def _entry_too_large(name: str, size: int, limit: int) -> AdaptationError:
    return AdaptationError("archive_too_large", f"{name!r} is {size} bytes uncompressed (limit {limit} per entry)",
                           {"entry": name, "uncompressed_bytes": size, "max_entry_bytes": limit})


def _too_large(name: str, size: tuple[int, int], limit: int) -> AdaptationError:
    return AdaptationError("image_too_large", f"{name} is {size[0]}×{size[1]} pixels (limit {limit} pixels; "
                           "Pillow's decompression-bomb guard)", {"entry": name, "width": size[0],
                                                                  "height": size[1], "max_pixels": limit})


def open_archive(path: Path, fmt: str | None = None, **options) -> ArchiveImageSet:
    return ArchiveImageSet(path, fmt, **options)
