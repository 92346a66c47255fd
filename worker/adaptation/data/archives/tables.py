"""Hugging Face `datasets` exports: a parquet file (`Dataset.to_parquet`, the Hub's parquet files) or a
zipped `save_to_disk` folder (Arrow IPC stream files `data-0000i-of-0000n.arrow` beside `state.json` and
`dataset_info.json`). Images are an `Image` column, a struct of `bytes` (the encoded file) and `path`;
labels a `ClassLabel` column (its names in the schema's `huggingface` metadata) or an integer `label`.

Read with pyarrow one record batch at a time, within the archive `Limits`: the row count and the
uncompressed size are checked from the file's metadata before any row is read, and the image bytes are
copied into a spill file, indexed like a `.tar.gz`'s, so decoding is the archives' own (lazy, batched,
same pixel limit and error codes)."""
from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from ...errors import AdaptationError
from ..formats import ARROW_SUFFIX
from .index import Entry, Spill, list_zip
from .limits import Limits
from .reader import copy_member

LABEL_COLUMNS = ("label", "labels")               # integer label columns recognised without metadata
ROWS_PER_BATCH = 256


def list_parquet(path: Path, limits: Limits, spill_dir: str | None
                 ) -> tuple[list[Entry], Spill, list[str] | None, list[str]]:
    """(one entry per row, the spill file, class names, notes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise AdaptationError("invalid_dataset", f"not a readable parquet file: {exc}") from None
    meta = pf.metadata
    limits.check_count(meta.num_rows)
    uncompressed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    limits.check_total(uncompressed)
    limits.check_total_ratio(uncompressed, path.stat().st_size)
    columns = _columns(pf.schema_arrow)
    # the metadata's sizes are the writer's word: the bytes actually read are held to the same limits
    return _spill_rows(pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns.read), columns, limits,
                       spill_dir, source_bytes=path.stat().st_size)


def list_hf_dataset(path: Path, limits: Limits, spill_dir: str | None
                    ) -> tuple[list[Entry], Spill, list[str] | None, list[str]]:
    """The zip is listed (and held to its limits) as an image archive is; its Arrow files are then
    expanded one at a time, in name order (`data-00000-of-…` first), into a temporary file that is
    memory-mapped, so memory holds the record batch being copied, not the shard."""
    import pyarrow as pa

    entries, _ = list_zip(path, limits)
    shards = sorted((e for e in entries if e.name.endswith(ARROW_SUFFIX)), key=lambda e: e.name)
    if not shards:
        raise AdaptationError("invalid_dataset", "the zip holds no .arrow file (zip the folder that "
                              "Dataset.save_to_disk wrote)")
    splits = sorted({e.name.rpartition("/")[0] for e in shards})
    if len(splits) > 1:
        raise AdaptationError("invalid_dataset", f"the zip holds {len(splits)} splits of a DatasetDict; zip the "
                              "folder of the one split to adapt on", {"splits": splits})

    def streams():
        for e in shards:
            shard = Spill(spill_dir)
            try:
                with open(path, "rb") as src, open(shard.path, "wb") as out:
                    copy_member(src, out, e)
                with pa.memory_map(shard.path) as mapped:
                    try:
                        stream = pa.ipc.open_stream(mapped)
                    except (pa.ArrowException, OSError) as exc:
                        raise AdaptationError("invalid_dataset", f"{e.name} is not an Arrow stream file: {exc}",
                                              {"entry": e.name}) from None
                    yield stream
            finally:
                shard.remove()

    shard_streams = streams()
    try:
        first = next(shard_streams)
        return _spill_rows(chain.from_iterable(chain([first], shard_streams)), _columns(first.schema), limits,
                           spill_dir, source_bytes=path.stat().st_size)
    finally:
        shard_streams.close()


class _Columns:
    def __init__(self, image: str, label: str | None, class_names: list[str] | None, notes: list[str]):
        self.image, self.label, self.class_names, self.notes = image, label, class_names, notes
        self.read = [image] + ([label] if label else [])


def _columns(schema) -> _Columns:
    """The image column and the label column, from `datasets`' feature metadata when the schema has it."""
    import pyarrow as pa

    features = {}
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw:
        try:
            features = json.loads(raw).get("info", {}).get("features", {}) or {}
        except (ValueError, AttributeError):
            features = {}
    notes: list[str] = []

    def is_image_struct(field) -> bool:
        if not pa.types.is_struct(field.type) or field.type.get_field_index("bytes") < 0:
            return False
        kind = field.type.field("bytes").type
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    typed = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    images = [n for n in typed if n in schema.names and is_image_struct(schema.field(n))]
    if not images:
        images = [f.name for f in schema if is_image_struct(f)]
    if not images:
        raise AdaptationError("invalid_dataset", "the table has no image column (an Image feature: a struct of "
                              "'bytes' and 'path')", {"columns": schema.names})
    if len(images) > 1:
        notes.append(f"{len(images)} image columns {images}: adapting on {images[0]!r}")

    label, class_names = None, None
    class_labels = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel"
                    and n in schema.names]
    if class_labels:
        label = class_labels[0]
        class_names = features[label].get("names") or None
    else:
        label = next((n for n in LABEL_COLUMNS if n in schema.names
                      and pa.types.is_integer(schema.field(n).type)), None)
    return _Columns(images[0], label, class_names, notes)


def _spill_rows(batches: Iterable, columns: _Columns, limits: Limits, spill_dir: str | None, source_bytes: int
                ) -> tuple[list[Entry], Spill, list[str] | None, list[str]]:
    """Copy every row's image bytes into a spill file: one entry per row, named by its row number."""
    spill = Spill(spill_dir)
    entries: list[Entry] = []
    labels: list[int | None] = []
    total = 0
    try:
        with open(spill.path, "wb") as out:
            for blob, path, label in _rows(batches, columns):
                name = f"row {len(entries):09d}"
                limits.check_count(len(entries) + 1)
                if blob is None:
                    raise AdaptationError("image_not_embedded", f"{name} has no image bytes"
                                          + (f", only the path {path!r} on the machine that wrote it" if path
                                             else "") + "; export the dataset with the images embedded",
                                          {"entry": name, "path": path})
                limits.check_entry_size(name, len(blob))
                total += len(blob)
                limits.check_stream(total, source_bytes)
                entries.append(Entry(name, out.tell(), len(blob), len(blob)))
                out.write(blob)
                labels.append(label)
    except BaseException:
        spill.remove()
        raise
    notes = list(columns.notes)
    class_names = columns.class_names
    if columns.label and (None in labels or min(labels) < 0):  # datasets writes -1 for "no label"
        notes.append(f"column {columns.label!r} has missing labels (-1 or null): the set is unlabelled")
        class_names = None
    elif columns.label:
        for e, y in zip(entries, labels):
            e.label = int(y)
    return entries, spill, class_names, notes


def _rows(batches: Iterable, columns: _Columns) -> Iterator[tuple[bytes | None, str | None, int | None]]:
    """(image bytes, path, label) per row. Each record batch is validated in full first (its offsets lie
    within its buffers: the file is untrusted); pyarrow's own errors become `invalid_dataset`."""
    import pyarrow as pa

    it = iter(batches)
    while True:
        try:
            batch = next(it, None)
            if batch is None:
                return
            batch.validate(full=True)
            images = batch.column(columns.image)
            blobs = images.field("bytes")
            paths = images.field("path") if _has(images, "path") else None
            labels = batch.column(columns.label).to_pylist() if columns.label else [None] * len(batch)
        except (pa.ArrowException, OSError, KeyError) as exc:  # a stream cut short is a plain OSError
            raise AdaptationError("invalid_dataset", f"the table cannot be read: {exc}") from None
        for j in range(len(batch)):
            yield blobs[j].as_py(), paths[j].as_py() if paths is not None else None, labels[j]


def _has(struct_array, name: str) -> bool:
    return struct_array.type.get_field_index(name) >= 0
