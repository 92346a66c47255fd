"""Builders of test inputs: image archives (good and hostile), checkpoints (good and malicious), and
allow-listable user-architecture packages. Shared by the engine tests and the HTTP tests; plain
functions, no pytest fixtures, small outputs (bytes to kilobytes)."""
from __future__ import annotations

import io
import os
import pickle
import stat
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

Files = dict[str, bytes] | list[tuple[str, bytes]]
MODE_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}


# --- images -----------------------------------------------------------------------------------------

def random_image(height: int = 8, width: int = 8, mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """uint8 H×W×C (C = 1, 3 or 4 for L, RGB, RGBA)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, MODE_CHANNELS[mode]), dtype=np.uint8)


def encode_image(arr: np.ndarray, image_format: str = "PNG", **save_kwargs) -> bytes:
    """Encode H×W×C uint8. WebP is lossless by default so decoded pixels equal `arr`."""
    from PIL import Image

    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if image_format.upper() == "WEBP":
        save_kwargs.setdefault("lossless", True)
    if image_format.upper() == "JPEG":
        save_kwargs.setdefault("quality", 95)
    buf = io.BytesIO()
    img.save(buf, image_format, **save_kwargs)
    return buf.getvalue()


def _items(files: Files) -> list[tuple[str, bytes]]:
    return list(files.items()) if isinstance(files, dict) else list(files)


# --- archives ---------------------------------------------------------------------------------------

def build_zip(path: Path, files: Files, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip of `name -> bytes` (a list of pairs may repeat a name)."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in _items(files):
            zf.writestr(zipfile.ZipInfo(name) if name.endswith("/") else _zinfo(name, compression), data)
    return path


def _zinfo(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type = compression
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def build_tar(path: Path, files: Files, gz: bool = False, symlinks: dict[str, str] | None = None,
              hardlinks: dict[str, str] | None = None, devices: Iterable[str] = ()) -> Path:
    """A tar (or tar.gz) of regular files, plus optional symlinks, hardlinks and character devices."""
    path = Path(path)
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in _items(files):
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
        for name, target in (hardlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.LNKTYPE, target
            tf.addfile(info)
        for name in devices:
            info = tarfile.TarInfo(name)
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(info)
    return path


def build_archive(path: Path, files: Files, fmt: str = "zip") -> Path:
    """`fmt`: "zip", "tar" or "tar.gz"."""
    if fmt == "zip":
        return build_zip(path, files)
    return build_tar(path, files, gz=fmt == "tar.gz")


def image_files(layout: str = "flat", classes: Iterable[str] = ("cat", "dog"), per_class: int = 3,
                size: tuple[int, int] = (8, 8), mode: str = "RGB", image_format: str = "PNG",
                wrapper: str | None = None, seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Encoded images for an archive and the decoded pixels expected back (exact for PNG/lossless WebP).

    layout "flat": `img_000.png`...; "classes": `<class>/img_000.png`. `wrapper` puts everything in one
    top-level folder (as zipping a folder does)."""
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[image_format.upper()]
    files, pixels = {}, {}
    groups = list(classes) if layout == "classes" else [None]
    count = per_class if layout == "classes" else per_class * len(list(classes))
    k = 0
    for group in groups:
        for i in range(count):
            arr = random_image(size[0], size[1], mode, seed=seed + k)
            k += 1
            name = f"img_{i:03d}.{ext}" if group is None else f"{group}/img_{i:03d}.{ext}"
            if wrapper:
                name = f"{wrapper}/{name}"
            files[name] = encode_image(arr, image_format)
            pixels[name] = arr
    return files, pixels


def encode_mask(mask: np.ndarray, mode: str = "L") -> bytes:
    """H×W uint8 class indices as a PNG: "L" (grey value = class) or "P" (palette index = class, with a
    palette whose colours are not the indices)."""
    from PIL import Image

    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    img = Image.frombytes("L", (mask.shape[1], mask.shape[0]), mask.tobytes())
    if mode == "P":
        img = Image.frombytes("P", img.size, mask.tobytes())  # the indices themselves, whatever the palette
        img.putpalette([(37 * i) % 256 for i in range(768)])
    elif mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def segmentation_files(n: int = 4, size: tuple[int, int] = (8, 8), num_classes: int = 3, masks: bool = True,
                       mask_mode: str = "L", wrapper: str | None = None, image_format: str = "PNG", seed: int = 0
                       ) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """`images/s_000.<ext>` (+ `masks/s_000.png`): (files, images N×H×W×3, masks N×H×W with some 255)."""
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[image_format.upper()]
    images = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (n, *size), dtype=np.uint8)
    labels[:, 0, 0] = 255
    files = {}
    top = f"{wrapper}/" if wrapper else ""
    for i in range(n):
        files[f"{top}images/s_{i:03d}.{ext}"] = encode_image(images[i], image_format)
        if masks:
            files[f"{top}masks/s_{i:03d}.png"] = encode_mask(labels[i], mask_mode)
    return files, images, labels


def image_archive(path: Path, fmt: str = "zip", **kwargs) -> tuple[Path, dict[str, np.ndarray]]:
    """Build an archive of random images (see `image_files`); returns (path, expected pixels by name)."""
    files, pixels = image_files(**kwargs)
    return build_archive(path, files, fmt), pixels


def zip_bomb(path: Path, entry_bytes: int = 8 << 20, entries: int = 1, name: str = "bomb_{}.png") -> Path:
    """Zeros deflate ~1000:1: `entries` entries of `entry_bytes` each."""
    zeros = b"\x00" * entry_bytes
    return build_zip(path, [(name.format(i), zeros) for i in range(entries)])


def zip_with_symlink(path: Path, link_name: str = "link.png", target: str = "/etc/passwd") -> Path:
    """A zip whose entry carries Unix symlink mode bits (as `zip --symlinks` writes)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(_zinfo("ok.png", zipfile.ZIP_DEFLATED), encode_image(random_image()))
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return Path(path)


def zip_with_encrypted_entry(path: Path) -> Path:
    """A zip whose entry is flagged as encrypted (general-purpose bit 0, local and central headers)."""
    build_zip(path, {"a.png": encode_image(random_image())}, compression=zipfile.ZIP_STORED)
    raw = bytearray(Path(path).read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    raw[local + 6] |= 0x1
    raw[central + 8] |= 0x1
    Path(path).write_bytes(bytes(raw))
    return Path(path)


def zip_with_overlapping_entries(path: Path) -> Path:
    """Two central-directory entries pointing at the same local file (the overlapping-file zip bomb)."""
    data = encode_image(random_image())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(_zinfo("a.png", zipfile.ZIP_STORED), data)
    raw = buf.getvalue()
    cd_start = raw.index(b"PK\x01\x02")
    eocd_start = raw.index(b"PK\x05\x06")
    central = raw[cd_start:eocd_start]
    second = central.replace(b"a.png", b"b.png")
    eocd = bytearray(raw[eocd_start:])
    # entries on this disk, total entries, central directory size
    eocd[8:10] = (2).to_bytes(2, "little")
    eocd[10:12] = (2).to_bytes(2, "little")
    eocd[12:16] = (len(central) * 2).to_bytes(4, "little")
    Path(path).write_bytes(raw[:cd_start] + central + second + bytes(eocd))
    return Path(path)


# --- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(state: dict, path: Path, fmt: str = "pt", wrap: str | None = None, prefix: str = "",
                    extra: dict | None = None) -> Path:
    """Save a state dict as `pt` (torch.save) or `safetensors`, optionally with every key prefixed
    (`module.`, `_orig_mod.`...) and wrapped (`{"state_dict": ...}` plus `extra` entries)."""
    import torch

    state = {f"{prefix}{k}": v for k, v in state.items()}
    path = Path(path)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    obj = state if wrap is None else {wrap: state, **(extra or {})}
    torch.save(obj, path)
    return path


class WriteMarker:
    """Unpickling this calls `open(marker, "w")`: a file appears if the unpickler runs arbitrary globals."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemMarker:
    """Unpickling this runs a shell command (`os.system`) that creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_checkpoint(path: Path, marker: Path, container: str = "torch", payload: str = "open",
                         state: dict | None = None) -> Path:
    """A checkpoint whose full unpickling would create `marker`.

    container "torch": torch.save's zip format, the payload next to a real state dict;
    "pickle": a raw pickle (protocol 2, the legacy torch.save framing's opcode stream);
    "pickle0": a protocol-0 pickle (text opcodes)."""
    import torch

    evil = WriteMarker(marker) if payload == "open" else SystemMarker(marker)
    obj = {"hook": evil, "state_dict": state or {"w": torch.zeros(2)}}  # the payload is unpickled first
    path = Path(path)
    if container == "torch":
        torch.save(obj, path)
    elif container == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    elif container == "pickle0":
        path.write_bytes(pickle.dumps(evil, protocol=0))
    else:
        raise ValueError(container)
    return path


# --- user architectures -----------------------------------------------------------------------------

USER_ARCH_SOURCE = '''
import pathlib
import torch
from torch import nn

IMPORT_MARKER = {marker!r}
if IMPORT_MARKER:
    pathlib.Path(IMPORT_MARKER).write_text("imported")


class SmallNet(nn.Module):
    def __init__(self, num_classes=10, width=8, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


class NoNormNet(nn.Module):
    def __init__(self, num_classes=10, in_features=3 * 8 * 8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def small_net(num_classes=10, **kwargs):
    return SmallNet(num_classes=num_classes, **kwargs)


def no_norm_net(num_classes=10, **kwargs):
    return NoNormNet(num_classes=num_classes, **kwargs)


def not_a_module(num_classes=10):
    return {{"num_classes": num_classes}}


NOT_CALLABLE = 3
'''


def write_user_arch_package(root: Path, package: str, import_marker: Path | None = None) -> str:
    """Write `<root>/<package>/models.py` (factories `small_net`, `no_norm_net`, `not_a_module`) and
    return the module path `<package>.models`. Importing it writes `import_marker` when given. Put
    `root` on sys.path (pytest: monkeypatch.syspath_prepend) to import it."""
    pkg = Path(root) / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(USER_ARCH_SOURCE.format(
        marker=str(import_marker) if import_marker else "")))
    return f"{package}.models"


# --- Hugging Face `datasets` exports and WebDataset shards --------------------------------------------
# Written with pyarrow in `datasets`' own on-disk layout (no `datasets` package needed): an Image column
# is a struct of `bytes` and `path`, a ClassLabel an int64 column whose names sit in the schema's
# `huggingface` metadata; save_to_disk writes Arrow *stream* files beside state.json and dataset_info.json.

def hf_table(images: list[bytes | None], labels: list[int] | None = None, class_names: list[str] | None = None,
             paths: list[str | None] | None = None, image_column: str = "image"):
    import json

    import pyarrow as pa

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": b, "path": p} for b, p in zip(images, paths or [None] * len(images))]
    columns, features = {image_column: pa.array(rows, type=image_type)}, {image_column: {"_type": "Image"}}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
        features["label"] = ({"names": class_names, "_type": "ClassLabel"} if class_names
                             else {"dtype": "int64", "_type": "Value"})
    table = pa.table(columns)
    return table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def hf_parquet(path: Path, table, row_group_size: int | None = None) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=row_group_size)
    return Path(path)


def hf_saved_dataset_zip(path: Path, table, shards: int = 1, folder: str = "my_dataset",
                         splits: Iterable[str] = ()) -> Path:
    """A zipped save_to_disk folder: `folder/data-0000i-of-0000n.arrow` (+ json), or one such folder per
    split under `folder/` with dataset_dict.json when `splits` is given (a DatasetDict)."""
    import json

    import pyarrow as pa

    def split_files(prefix: str) -> dict[str, bytes]:
        files, names = {}, []
        for i, part in enumerate(_split_rows(table, shards)):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(part)
            name = f"data-{i:05d}-of-{shards:05d}.arrow"
            files[f"{prefix}{name}"] = sink.getvalue().to_pybytes()
            names.append(name)
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        files[f"{prefix}dataset_info.json"] = json.dumps({"features": features}).encode()
        files[f"{prefix}state.json"] = json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0123456789abcdef", "_format_columns": None,
                                                   "_format_kwargs": {}, "_format_type": None,
                                                   "_output_all_columns": False, "_split": None}).encode()
        return files

    splits = list(splits)
    files: dict[str, bytes] = {}
    if splits:
        files[f"{folder}/dataset_dict.json"] = json.dumps({"splits": splits}).encode()
        for s in splits:
            files.update(split_files(f"{folder}/{s}/"))
    else:
        files.update(split_files(f"{folder}/"))
    return build_zip(path, files)


def _split_rows(table, shards: int):
    n = table.num_rows
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


def webdataset_files(images: list[bytes], labels: list[int] | None, ext: str = "png",
                     prefix: str = "shard0/sample", extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """`<prefix>000123.<ext>` with `<prefix>000123.cls` (the label as text) beside it; `extra` adds
    per-sample metadata files (`{".json": b"{}"}`)."""
    files: dict[str, bytes] = {}
    for i, data in enumerate(images):
        key = f"{prefix}{i:06d}"
        files[f"{key}.{ext}"] = data
        if labels is not None:
            files[f"{key}.cls"] = str(labels[i]).encode()
        for suffix, blob in (extra or {}).items():
            files[f"{key}{suffix}"] = blob
    return files


# --- detection: COCO JSON beside the images -----------------------------------------------------------

def coco_document(file_names: list[str], sizes: list[tuple[int, int]], boxes: list[tuple[int, list[float], int]],
                  categories: dict[int, str] | None = None) -> dict:
    """A COCO annotation dict: `sizes` (height, width) per image, `boxes` (image position, [x, y, w, h],
    category_id) per annotation; image ids are 100 + position (not the archive's order)."""
    categories = categories or {1: "one", 2: "two"}
    return {"images": [{"id": 100 + i, "file_name": f, "height": h, "width": w}
                       for i, (f, (h, w)) in enumerate(zip(file_names, sizes))],
            "annotations": [{"id": k, "image_id": 100 + i, "bbox": bbox, "category_id": c, "iscrowd": 0,
                             "area": bbox[2] * bbox[3]} for k, (i, bbox, c) in enumerate(boxes)],
            "categories": [{"id": c, "name": n} for c, n in categories.items()]}


def coco_archive(path: Path, fmt: str = "zip", count: int = 3, size: tuple[int, int] = (24, 32),
                 boxes: list[tuple[int, list[float], int]] | None = None, document: dict | None = None,
                 json_name: str = "annotations.json", folder: str = "images") -> tuple[Path, dict]:
    """`images/img_000.png`... beside a COCO `annotations.json` naming them by base name (as COCO does);
    returns (path, the COCO document)."""
    names = [f"img_{i:03d}.png" for i in range(count)]
    if boxes is None:
        boxes = [(0, [2.0, 3.0, 10.0, 8.0], 1), (0, [15.0, 10.0, 12.5, 9.0], 2), (2, [0.0, 0.0, 32.0, 24.0], 1)]
    doc = document or coco_document(names, [size] * count, boxes)
    import json

    files = {f"{folder}/{n}" if folder else n: encode_image(random_image(size[0], size[1], seed=i))
             for i, n in enumerate(names)}
    files[json_name] = json.dumps(doc).encode()
    return build_archive(path, files, fmt), doc
