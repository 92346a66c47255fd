"""Hugging Face `datasets` exports (parquet, a zipped save_to_disk folder) and WebDataset tar shards:
detected, read pixel-exact with their labels, and held to the archives' limits with precise codes.
Fixtures are written with pyarrow in `datasets`' on-disk layout (tests/builders.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.builders
from tests import builders as B  # noqa: E402
from worker.adaptation.data.images import detect_format, open_image_set  # noqa: E402
from worker.adaptation.errors import AdaptationError  # noqa: E402

torch.set_num_threads(1)
CLASSES = ["zero", "one", "two"]


def test_the_contract_names_every_format_the_worker_reads():
    from typing import get_args

    from app.contract.jobs import DatasetFormat
    from worker.adaptation.data.images import READERS

    assert set(get_args(DatasetFormat)) == set(READERS)


def images(n: int = 9, size: int = 8, mode: str = "RGB", fmt: str = "PNG") -> tuple[list[bytes], np.ndarray]:
    pixels = np.stack([B.random_image(size, size, mode, seed=i) for i in range(n)])
    return [B.encode_image(p, fmt) for p in pixels], pixels


def read_all(s) -> np.ndarray:
    return torch.cat([x for x, _ in s.batches(4)]).numpy()


def refused(code: str, fn, *args, **kw) -> AdaptationError:
    with pytest.raises(AdaptationError) as info:
        s = fn(*args, **kw)
        read_all(s)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def opened(path, **kw):
    kw.setdefault("num_workers", 0)
    return open_image_set(path, **kw)


# --- parquet ----------------------------------------------------------------------------------------

def test_parquet_with_class_labels(tmp_path):
    blobs, pixels = images(9)
    labels = [i % 3 for i in range(9)]
    path = B.hf_parquet(tmp_path / "train-00000-of-00001.parquet", B.hf_table(blobs, labels, CLASSES),
                        row_group_size=4)  # rows span three row groups: order must hold across them
    assert detect_format(path) == "parquet"
    s = opened(path)
    assert len(s) == 9 and s.class_names == CLASSES
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_array_equal(read_all(s), pixels)
    s.close()


def test_parquet_unlabelled_other_column_names_and_missing_labels(tmp_path):
    blobs, pixels = images(4, mode="L")
    s = opened(B.hf_parquet(tmp_path / "a.parquet", B.hf_table(blobs, image_column="img")))
    assert s.labels is None and s.channels == 1
    np.testing.assert_array_equal(read_all(s), pixels)
    s = opened(B.hf_parquet(tmp_path / "b.parquet", B.hf_table(blobs, [0, -1, 1, 1], ["a", "b"])))
    assert s.labels is None and any("missing labels" in n for n in s.notes)


def test_parquet_large_binary_images_without_metadata(tmp_path):
    """Writers other than `datasets` (polars, pandas) may store the struct's bytes as large_binary and
    leave out the `huggingface` metadata: the image column is still found by its shape."""
    import pyarrow as pa

    blobs, pixels = images(3)
    kind = pa.struct([("bytes", pa.large_binary()), ("path", pa.string())])
    table = pa.table({"id": [7, 8, 9], "picture": pa.array([{"bytes": b, "path": None} for b in blobs], kind),
                      "label": pa.array([2, 0, 1], pa.int32())})
    s = opened(B.hf_parquet(tmp_path / "other.parquet", table))
    np.testing.assert_array_equal(read_all(s), pixels)
    np.testing.assert_array_equal(s.labels, [2, 0, 1])
    assert s.class_names is None


def test_parquet_refusals(tmp_path):
    blobs, _ = images(5)
    err = refused("image_not_embedded", opened, B.hf_parquet(tmp_path / "paths.parquet", B.hf_table(
        [blobs[0], None], paths=[None, "/home/me/cats/1.png"])))
    assert err.detail == {"entry": "row 000000001", "path": "/home/me/cats/1.png"}
    refused("archive_too_many_entries", opened, B.hf_parquet(tmp_path / "many.parquet", B.hf_table(blobs)),
            max_entries=4)
    refused("archive_too_large", opened, B.hf_parquet(tmp_path / "big.parquet", B.hf_table(blobs)),
            max_total_bytes=100)
    huge = [B.encode_image(np.zeros((64, 64, 3), np.uint8))] * 4
    refused("image_too_large", opened, B.hf_parquet(tmp_path / "px.parquet", B.hf_table(huge)), max_pixels=1000)
    refused("not_an_image", opened, B.hf_parquet(tmp_path / "junk.parquet", B.hf_table([b"not an image"])))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "text.parquet")
    err = refused("invalid_dataset", opened, tmp_path / "text.parquet")
    assert err.detail["columns"] == ["text"]


def test_corrupt_parquet_is_an_input_error(tmp_path):
    """Damaged pages or a cut-off file fail with the input's error code, never as an internal error."""
    blobs, _ = images(6)
    path = B.hf_parquet(tmp_path / "a.parquet", B.hf_table(blobs, [0, 1, 2, 0, 1, 2], CLASSES))
    raw = bytearray(path.read_bytes())
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(bytes(raw[: len(raw) // 2]))
    refused("invalid_dataset", opened, cut)  # detected by its leading magic, refused for the missing footer
    for start in range(8, len(raw) // 2, 97):  # flip bytes inside the data pages
        raw[start] ^= 0xFF
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(raw))
    with pytest.raises(AdaptationError) as info:
        read_all(opened(bad))
    assert info.value.code in ("invalid_dataset", "corrupt_image", "truncated_image", "not_an_image"), info.value


def test_parquet_compression_ratio_is_checked_before_rows_are_read(tmp_path):
    """Zeros compress well in parquet too: a 4 MB image column of zeros in a small file is refused from the
    file's metadata, as a zip bomb is."""
    blob = b"\x89PNG\r\n\x1a\n" + b"\x00" * (4 << 20)
    import pyarrow.parquet as pq

    path = tmp_path / "bomb.parquet"
    pq.write_table(B.hf_table([blob]), path, compression="zstd")
    assert path.stat().st_size < 100_000
    refused("archive_compression_ratio", opened, path)


# --- save_to_disk, zipped ---------------------------------------------------------------------------

def test_saved_dataset_zip(tmp_path):
    blobs, pixels = images(7, fmt="WEBP")
    labels = [i % 3 for i in range(7)]
    path = B.hf_saved_dataset_zip(tmp_path / "ds.zip", B.hf_table(blobs, labels, CLASSES), shards=3)
    assert detect_format(path) == "hf_dataset"
    spill = tmp_path / "spill"
    spill.mkdir()
    s = opened(path, spill_dir=str(spill))
    assert len(list(spill.iterdir())) == 1  # the images' spill file; each expanded shard is gone
    assert len(s) == 7 and s.class_names == CLASSES
    np.testing.assert_array_equal(s.labels, labels)  # rows in shard order
    np.testing.assert_array_equal(read_all(s), pixels)
    s.close()
    assert list(spill.iterdir()) == []


def test_saved_dataset_zip_refusals(tmp_path):
    blobs, _ = images(3)
    table = B.hf_table(blobs, [0, 1, 2], CLASSES)
    err = refused("invalid_dataset", opened, B.hf_saved_dataset_zip(tmp_path / "dict.zip", table,
                                                                     splits=["train", "test"]))
    assert err.detail["splits"] == ["my_dataset/test", "my_dataset/train"]
    bad = B.build_zip(tmp_path / "bad.zip", {"d/state.json": b"{}", "d/data-00000-of-00001.arrow": b"garbage"})
    assert detect_format(bad) == "hf_dataset"
    refused("invalid_dataset", opened, bad)
    refused("archive_too_many_entries", opened, B.hf_saved_dataset_zip(tmp_path / "n.zip", table), max_entries=2)
    import zipfile

    with zipfile.ZipFile(B.hf_saved_dataset_zip(tmp_path / "whole.zip", table)) as zf:
        shard = zf.read("my_dataset/data-00000-of-00001.arrow")
    cut = B.build_zip(tmp_path / "cut.zip", {"d/state.json": b"{}", "d/data-00000-of-00001.arrow": shard[:-200]})
    spill = tmp_path / "spill"
    spill.mkdir()
    err = refused("invalid_dataset", opened, cut, spill_dir=str(spill))  # a stream cut short mid-batch
    assert list(spill.iterdir()) == []  # neither the expanded shard nor the partial spill is left behind
    assert "cannot be read" in err.message or "not an Arrow stream" in err.message
    bomb = B.build_zip(tmp_path / "bomb.zip", {"d/state.json": b"{}",
                                              "d/data-00000-of-00001.arrow": b"\x00" * (8 << 20)})
    refused("archive_compression_ratio", opened, bomb)


# --- WebDataset -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
def test_webdataset_shard(tmp_path, fmt):
    blobs, pixels = images(6)
    labels = [5, 0, 7, 5, 1, 0]  # .cls holds the class index itself, not a folder name
    files = B.webdataset_files(blobs, labels, extra={".json": b'{"source": "camera 3"}'})
    path = B.build_archive(tmp_path / f"shard-000000.{fmt}", files, fmt)
    assert detect_format(path) == "tar"
    s = opened(path)
    assert len(s) == 6 and s.class_names is None
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_array_equal(read_all(s), pixels)
    assert any("WebDataset" in n and "6 .cls" in n and "6 .json" in n for n in s.notes)
    s.close()


@pytest.mark.parametrize("fmt", ["tar", "tar.gz"])
def test_webdataset_refusals(tmp_path, fmt):
    blobs, _ = images(3)
    files = B.webdataset_files(blobs, [0, 1, 2])
    del files["shard0/sample000001.cls"]
    err = refused("invalid_archive_layout", opened, B.build_archive(tmp_path / f"a.{fmt}", files, fmt))
    assert err.detail["examples"] == ["shard0/sample000001.png"]
    files = B.webdataset_files(blobs, [0, 1, 2])
    files["shard0/sample000002.cls"] = b"cat"
    refused("invalid_label", opened, B.build_archive(tmp_path / f"b.{fmt}", files, fmt))
    files["shard0/sample000002.cls"] = b"1" * 100
    refused("invalid_label", opened, B.build_archive(tmp_path / f"c.{fmt}", files, fmt))
    # metadata files without labels are not a WebDataset shard: the archive's own refusal, unchanged
    files = {"a.png": blobs[0], "a.txt": b"a caption"}
    err = refused("not_an_image", opened, B.build_archive(tmp_path / f"d.{fmt}", files, fmt))
    assert err.detail["entry"] == "a.txt"
    # the limits hold for shards as for any archive
    refused("archive_too_many_entries", opened, B.build_archive(
        tmp_path / f"e.{fmt}", B.webdataset_files(blobs, [0, 1, 2]), fmt), max_entries=4)

