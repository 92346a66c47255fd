"""Which dataset format a file is, told from its bytes alone (and a zip's directory): the one place formats
are told apart, for the API's submit checks and the worker's readers alike (standard library only)."""
from __future__ import annotations

import zipfile
from typing import IO

from . import CheckError

# Read by archives.ArchiveImageSet. A WebDataset shard is a "tar"; "parquet" and "hf_dataset" (a zipped
# save_to_disk folder) are Hugging Face `datasets` exports.
ARCHIVE_FORMATS = ("zip", "tar", "parquet", "hf_dataset")
ARROW_SUFFIX = ".arrow"
HF_MARKERS = ("state.json", "dataset_info.json")  # save_to_disk writes both beside its .arrow files


def is_hf_dataset_zip(names: list[str]) -> bool:
    """A zipped `save_to_disk` folder: Arrow files beside `datasets`' own json files."""
    return (any(n.endswith(ARROW_SUFFIX) for n in names)
            and any(n.rsplit("/", 1)[-1] in HF_MARKERS for n in names))


def detect_format(f: IO[bytes]) -> str:
    """One of "npz", "parquet", "hf_dataset", "zip", "tar" (plain or gzip; WebDataset shards too), from a
    seekable binary file; CheckError("unsupported_format") otherwise."""
    f.seek(0)
    head = f.read(512)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK"):
        # npz is a zip whose members end in .npy
        try:
            f.seek(0)
            endrec = zipfile._EndRecData(f)
            if endrec and endrec[zipfile._ECD_ENTRIES_TOTAL] > 1_000_000:
                return "zip"  # not parsed here: the archive reader refuses it by its entry limit
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            raise CheckError("unsupported_format", "the file looks like a zip but cannot be opened") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "hf_dataset" if is_hf_dataset_zip(names) else "zip"
    if head[:2] == b"\x1f\x8b" or (len(head) > 262 and head[257:262] == b"ustar"):
        return "tar"
    raise CheckError("unsupported_format", "could not detect the dataset format (expected npz, zip, tar, "
                          "parquet, or a zipped Hugging Face save_to_disk folder)")
