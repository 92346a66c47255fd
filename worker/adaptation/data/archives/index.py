"""Indexing an archive once, before any pixel is decoded: list its entries within the `Limits` (zip
central directory; tar members streamed; a `.tar.gz` expanded into a spill file holding only the
image bytes, since a gzip stream cannot be seeked), then probe every image header and build the
`Index` the reader decodes from (one output size, one channel count, labels from the layout)."""
from __future__ import annotations

import os
import stat
import struct
import tarfile
import tempfile
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.checks import CheckError
from app.checks.archive_names import ignored, mask_layout

from ...errors import AdaptationError
from .coco import ANNOTATION_SUFFIX, check_annotation_size, find_annotation_file, parse_coco, resize_boxes
from .decode import CHANNEL_MODE, decode_mask, probe_image, undecodable
from .layout import (LABEL_SUFFIX, MAX_LABEL_BYTES, duplicates, folder_labels, is_sidecar, normalise,
                     sidecar_labels)
from .limits import Limits
from .reader import COPY_CHUNK, Index, Reader, read_member

PEEK_BYTES = 64 * 1024           # bytes read to parse an image header while indexing


@dataclass
class Entry:
    """One candidate image entry found while listing the archive."""

    name: str                 # normalised path inside the archive ("a/b.png"), never used as a file path
    offset: int               # zip: local header offset; raw: first data byte
    csize: int                # bytes stored in the file
    usize: int                # uncompressed bytes
    method: int = 0           # zip compression method (0 for raw)
    crc: int = 0
    dims: tuple[int, int, int] | None = None  # (width, height, channels) when probed while listing
    sidecar: bool = False     # a WebDataset metadata file (`.cls`, `.json`, `.txt`), not an image
    text: bytes | None = None  # a `.cls` file's content, read while listing
    label: int | None = None  # the class given beside the image (a table's label column)


class Spill:
    """A temporary file holding image bytes expanded from a stream; removed with its owner, and never by
    a forked loader worker."""

    def __init__(self, spill_dir: str | None):
        fd, self.path = tempfile.mkstemp(prefix="adaptd-archive-", suffix=".spill", dir=spill_dir)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_spill, self.path, os.getpid())

    def remove(self) -> None:
        self._finalizer()


def _remove_spill(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked loader worker must never delete its parent's spill file
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- listing ----------------------------------------------------------------------------------------

def list_zip(path: Path, limits: Limits) -> tuple[list[Entry], int]:
    """(candidate image entries, number of ignored entries)."""
    archive_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            endrec = zipfile._EndRecData(f)  # the entry count, read before parsing the directory
    except Exception:  # noqa: BLE001 - fall through: ZipFile reports the problem below
        endrec = None
    if endrec:
        limits.check_count(endrec[zipfile._ECD_ENTRIES_TOTAL])
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise AdaptationError("invalid_archive", f"not a readable zip archive: {exc}") from None
    limits.check_count(len(infos))

    total_u = 0
    spans = []  # (offset, end) of every entry's bytes: overlapping entries are a known zip bomb
    entries: list[Entry] = []
    n_ignored = 0
    for info in infos:
        name = normalise(info.filename)
        mode = (info.external_attr >> 16) & 0xFFFF
        if mode and (stat.S_ISLNK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)
                     or stat.S_ISSOCK(mode)):
            raise AdaptationError("archive_symlink", f"the archive holds a link or device entry: {info.filename!r}"
                                  "; only regular files are read", {"entry": info.filename})
        total_u += info.file_size
        spans.append((info.header_offset, info.header_offset + 30 + info.compress_size, info.filename))
        limits.check_total(total_u)
        if info.is_dir() or name == "":
            continue
        if ignored(name):
            n_ignored += 1
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
        limits.check_entry(info.filename, info.file_size, info.compress_size)
        entries.append(Entry(name, info.header_offset, info.compress_size, info.file_size,
                             info.compress_type, info.CRC))
    spans.sort()
    for (start, end, a), (nstart, _, b) in zip(spans, spans[1:]):
        if end > nstart:
            raise AdaptationError("archive_compression_ratio", "the archive's entries overlap (a zip-bomb "
                                  f"construction): {a!r} and {b!r}", {"entries": [a, b]})
    if spans and spans[-1][1] > archive_size:
        raise AdaptationError("invalid_archive", f"the zip archive is truncated ({spans[-1][2]!r} runs past "
                              "its end)", {"entry": spans[-1][2]})
    limits.check_total_ratio(total_u, archive_size)
    return entries, n_ignored


def list_tar(path: Path, limits: Limits, max_pixels: int, spill_dir: str | None
             ) -> tuple[list[Entry], int, Spill | None]:
    """(candidate image entries, ignored entries, the spill file of a `.tar.gz` or None)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        return _list_tar_gz(path, limits, max_pixels, spill_dir)
    return (*_list_tar_plain(path, limits), None)


def _tar_member(m: tarfile.TarInfo, limits: Limits, count: int, total_u: int) -> str | None:
    """Checks one member; returns its normalised name when it is a candidate image."""
    limits.check_count(count, at_least=True)
    name = normalise(m.name)
    if m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo():
        raise AdaptationError("archive_symlink", f"the archive holds a link or device entry: {m.name!r}; only "
                              "regular files are read", {"entry": m.name})
    limits.check_total(total_u)
    if m.isdir() or name == "":
        return None
    if not m.isreg() or m.issparse():
        raise AdaptationError("invalid_archive", f"{m.name!r} is not a regular file (tar type {m.type!r})",
                              {"entry": m.name})
    return name


def _list_tar_plain(path: Path, limits: Limits) -> tuple[list[Entry], int]:
    entries: list[Entry] = []
    n_ignored = count = total_u = 0
    archive_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                m = tf.next()
                if m is None:
                    break
                tf.members.clear()  # keep memory flat on huge archives: we hold our own index
                count += 1
                total_u += m.size
                name = _tar_member(m, limits, count, total_u)
                if name is None:
                    continue
                if ignored(name):
                    n_ignored += 1
                    continue
                limits.check_entry(m.name, m.size, m.size)
                if m.offset_data + m.size > archive_size:
                    raise AdaptationError("invalid_archive", f"the tar archive is truncated ({m.name!r} runs "
                                          "past its end)", {"entry": m.name})
                if is_sidecar(name):
                    entries.append(_sidecar(name, m, tf.extractfile(m)))
                    continue
                entries.append(Entry(name, m.offset_data, m.size, m.size))
    except AdaptationError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise AdaptationError("invalid_archive", f"not a readable tar archive: {exc}") from None
    return entries, n_ignored


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


def _list_tar_gz(path: Path, limits: Limits, max_pixels: int, spill_dir: str | None
                 ) -> tuple[list[Entry], int, Spill]:
    spill = Spill(spill_dir)
    entries: list[Entry] = []
    n_ignored = count = total_u = 0
    raw = _CountingReader(open(path, "rb"))  # noqa: SIM115 - closed below
    try:
        with open(spill.path, "wb") as out, tarfile.open(fileobj=raw, mode="r|gz") as tf:
            for m in tf:
                tf.members.clear()
                count += 1
                total_u += m.size
                name = _tar_member(m, limits, count, total_u)
                if name is None:
                    continue
                if ignored(name):
                    n_ignored += 1
                    continue
                limits.check_entry_size(m.name, m.size)
                src = tf.extractfile(m)
                annotation = name.lower().endswith(ANNOTATION_SUFFIX)  # maybe COCO labels: kept in the spill
                if is_sidecar(name) and not annotation:
                    entries.append(_sidecar(name, m, src))
                    limits.check_stream(m.offset_data + m.size, raw.count)
                    continue
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
                    limits.check_stream(m.offset_data + done, raw.count)
                limits.check_stream(m.offset_data + m.size, raw.count)
                if annotation:
                    entries.append(Entry(name, start, m.size, m.size, sidecar=True))
                    continue
                dims = probe_image(name, head, m.size, lambda: _read_back(out, spill.path, start, m.size),
                                   max_pixels)
                entries.append(Entry(name, start, m.size, m.size, dims=dims))
    except AdaptationError:
        spill.remove()
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, UnicodeDecodeError) as exc:
        spill.remove()
        raise AdaptationError("invalid_archive", f"not a readable tar.gz archive: {exc}") from None
    finally:
        raw.close()
    return entries, n_ignored, spill


def _sidecar(name: str, m: tarfile.TarInfo, src) -> Entry:
    """A WebDataset metadata member: a `.cls` label is read (a few bytes), the others are skipped."""
    if not name.lower().endswith(LABEL_SUFFIX):
        return Entry(name, m.offset_data, m.size, m.size, sidecar=True)
    if m.size > MAX_LABEL_BYTES:
        raise AdaptationError("invalid_label", f"{name} is {m.size} bytes; a {LABEL_SUFFIX} file holds one integer "
                              f"(at most {MAX_LABEL_BYTES} bytes)", {"entry": name})
    return Entry(name, m.offset_data, m.size, m.size, sidecar=True, text=src.read(m.size))


def _read_back(out, path: str, start: int, size: int) -> bytes:
    out.flush()
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


# --- the index --------------------------------------------------------------------------------------

def build_index(entries: list[Entry], n_ignored: int, kind: str, source: str, *, max_pixels: int,
                preprocess_size: int | None, notes: list[str], class_names: list[str] | None = None,
                masks: bool = False, pad_mixed_sizes: bool = False
                ) -> tuple[Index, np.ndarray | dict | None, list[str] | None, dict | None]:
    """(index, labels, class_names, category mapping) from the listed entries; every image header is
    probed. Labels come from a COCO annotation file (box labels, a dict: `coco`), the entries' own
    `label` (tables; `class_names` names them), `.cls` files (WebDataset) or the folders; with `masks`
    (segmentation), from `masks/NAME.png` beside `images/NAME.ext`: N×H×W uint8 class indices, decoded
    here (within the same limits). `pad_mixed_sizes` (detection): images of several sizes, without a
    preprocess size, are padded at the bottom and right to the largest height and width, so every pixel
    (and box) keeps its coordinates."""
    annotation_name = None if masks else find_annotation_file(
        [e.name for e in entries], [e.name for e in entries if not is_sidecar(e.name)])
    annotation = next((e for e in entries if e.name == annotation_name), None)
    if annotation is not None:
        check_annotation_size(annotation.name, annotation.usize)
        entries = [e for e in entries if e is not annotation]
    sidecars = {e.name: e.text for e in entries if e.sidecar}
    if sidecars and not any(n.lower().endswith(LABEL_SUFFIX) for n in sidecars):
        raise undecodable(next(iter(sidecars)), b"", ValueError("a metadata file without .cls labels"))
    entries = [e for e in entries if not e.sidecar]
    if n_ignored:
        notes.append(f"ignored {n_ignored} entries (__MACOSX/, dotfiles, Thumbs.db, desktop.ini)")
    if not entries:
        raise AdaptationError("empty_archive", "the archive holds no images"
                              + (f" ({n_ignored} ignored entries: __MACOSX/, dotfiles)" if n_ignored else ""),
                              {"ignored_entries": n_ignored})
    dupes = duplicates([e.name for e in entries])
    if dupes:
        raise AdaptationError("archive_duplicate_entry", f"the archive holds {len(dupes)} paths more than once",
                              {"entries": dupes[:20]})
    entries.sort(key=lambda e: e.name)
    names = [e.name for e in entries]
    mask_entries, mapping = None, None
    if annotation is not None:
        labels = None  # read below, once the images' sizes are known
    elif masks:
        try:
            layout = mask_layout(names)
        except CheckError as exc:
            raise AdaptationError(exc.code, exc.message, exc.detail) from None
        by_name = {e.name: e for e in entries}
        entries = [by_name[n] for n in layout.images]
        names = list(layout.images)
        mask_entries = [by_name[n] for n in layout.masks] if layout.masks is not None else None
        labels = None
    elif any(e.label is not None for e in entries):
        labels = np.fromiter((e.label for e in entries), np.int64, len(entries))
    elif sidecars:
        labels, class_names = sidecar_labels(names, sidecars, notes), None
    else:
        labels, class_names = folder_labels(names, notes)
    n = len(entries)
    index = Index(
        source=source, kind=kind, names=names,
        offsets=np.fromiter((e.offset for e in entries), np.int64, n),
        csizes=np.fromiter((e.csize for e in entries), np.int64, n),
        usizes=np.fromiter((e.usize for e in entries), np.int64, n),
        methods=np.fromiter((e.method for e in entries), np.int16, n),
        crcs=np.fromiter((e.crc for e in entries), np.uint32, n),
        heights=np.zeros(n, np.int32), widths=np.zeros(n, np.int32),
        out_hw=(0, 0), channels=0, max_pixels=max_pixels)
    reader = Reader(index)
    channels = np.zeros(n, np.int8)
    try:
        for i, e in enumerate(entries):
            w, h, c = e.dims or probe_image(names[i], reader.read(i, limit=PEEK_BYTES), e.usize,
                                            lambda i=i: reader.read(i), max_pixels)
            index.widths[i], index.heights[i], channels[i] = w, h, c
        if annotation is not None:
            a = annotation
            text = read_member(reader._file(), kind, a.offset, a.csize, a.usize, a.method, a.crc, a.name, None)
            labels, class_names, mapping = parse_coco(a.name, text, names, index.widths, index.heights, notes)
            notes.append(f"box labels from {a.name}: {len(labels['boxes'])} boxes on {n} images")
    finally:
        reader.close()
    sizes = set(zip(index.heights.tolist(), index.widths.tolist()))
    if len(sizes) == 1:
        index.out_hw = sizes.pop()
        index.resize = np.zeros(n, dtype=bool)
    elif preprocess_size is None and pad_mixed_sizes and not masks:
        index.out_hw = (int(index.heights.max()), int(index.widths.max()))
        index.resize = np.zeros(n, dtype=bool)
        index.pad = True
        notes.append(f"{len(sizes)} image sizes: padded with black at the bottom and right to "
                     f"{index.out_hw[1]}×{index.out_hw[0]} (pixels keep their coordinates)")
    elif preprocess_size is None:
        examples = {}
        for i in range(n):
            examples.setdefault(f"{index.widths[i]}x{index.heights[i]}", names[i])
            if len(examples) >= 5:
                break
        raise AdaptationError("mixed_image_sizes",
                              f"the archive's images have {len(sizes)} different sizes; set preprocess.size so "
                              "they can be resized to one", {"examples": examples, "sizes": len(sizes)})
    else:
        s = int(preprocess_size)
        index.out_hw = (s, s)
        index.resize = (index.heights != s) | (index.widths != s)
        notes.append(f"{len(sizes)} image sizes: {int(index.resize.sum())} images are resized to {s}×{s} "
                     "on the CPU while loading")
    if isinstance(labels, dict) and index.resize.any():
        labels = resize_boxes(labels, index.widths, index.heights, index.out_hw)
        notes.append("box labels scaled with their resized images")
    if mask_entries is not None:
        labels = _decode_masks(mask_entries, index, kind, source)
    present = sorted(set(channels.tolist()))
    index.channels = max(present)
    if len(present) > 1:
        notes.append(f"mixed channel counts {present}: every image is converted to "
                     f"{CHANNEL_MODE[index.channels]}")
    return index, labels, class_names, mapping


def _decode_masks(entries: list[Entry], index: Index, kind: str, source: str) -> np.ndarray:
    """The masks of the indexed images (same order), N×H×W uint8 at the images' output size."""
    out_h, out_w = index.out_hw
    labels = np.empty((len(entries), out_h, out_w), np.uint8)
    with open(source, "rb") as f:
        for i, e in enumerate(entries):
            data = read_member(f, kind, e.offset, e.csize, e.usize, e.method, e.crc, e.name, None)
            labels[i] = decode_mask(e.name, data, (int(index.widths[i]), int(index.heights[i])), index.max_pixels,
                                    (out_w, out_h) if index.resize[i] else None)
    return labels
