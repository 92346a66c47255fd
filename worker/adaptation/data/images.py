"""The image-set interface the engine adapts on, and the format dispatch."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ..errors import AdaptationError


class ImageSet(Protocol):
    """A finite, ordered set of uint8 images (N×H×W×C), optionally labelled."""

    labels: np.ndarray | None        # int64 (N,) or None
    class_names: list[str] | None    # label index -> name, when the format carries names

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, order: np.ndarray | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 NHWC tensor, int64 index tensor) in `order` (default: stored order)."""
        ...


class ArrayImageSet:
    """An in-memory uint8 array (npz). Batches are zero-copy slices."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, class_names: list[str] | None = None):
        if x.ndim == 3:
            x = x[..., None]
        self.x = x
        self.labels = y
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int, order: np.ndarray | None = None):
        n = len(self.x)
        for start in range(0, n, batch_size):
            if order is None:
                idx = np.arange(start, min(start + batch_size, n))
                xb = self.x[start:start + batch_size]
            else:
                idx = order[start:start + batch_size]
                xb = self.x[idx]
            yield torch.from_numpy(np.ascontiguousarray(xb)), torch.from_numpy(idx.astype(np.int64))


def read_npz(path: Path) -> ArrayImageSet:
    """`x`: uint8 N×H×W[×C]; optional `y`: integer labels. Read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise AdaptationError("invalid_dataset", f"npz has no 'x' array (found: {archive.files})")
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except AdaptationError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise AdaptationError("invalid_dataset", f"npz could not be read without pickle: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the input's fault
        raise AdaptationError("invalid_dataset", f"not a readable npz file: {exc}") from None
    if x.dtype != np.uint8:
        raise AdaptationError("invalid_dataset", f"'x' must be uint8, got {x.dtype}",
                              {"dtype": str(x.dtype)})
    if x.ndim not in (3, 4) or len(x) == 0 or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise AdaptationError("invalid_dataset", f"'x' must be N×H×W or N×H×W×C (C in 1,3,4), got {x.shape}",
                              {"shape": list(x.shape)})
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise AdaptationError("invalid_dataset", f"'y' must be {len(x)} integer labels, got {y.dtype}{y.shape}")
        y = y.astype(np.int64)
    return ArrayImageSet(x, y)


def _read_npz(path: Path, **_options) -> ArrayImageSet:
    return read_npz(path)  # arrays share one size: preprocess_size and loader options do not apply


def _read_archive(fmt: str):
    def read(path: Path, **options) -> ImageSet:
        from .archives import ArchiveImageSet  # Pillow (and pyarrow for tables) imported only when read

        return ArchiveImageSet(path, fmt, **options)
    return read


# Read by archives.ArchiveImageSet. A WebDataset shard is a "tar"; "parquet" and "hf_dataset" (a zipped
# save_to_disk folder) are Hugging Face `datasets` exports.
ARCHIVE_FORMATS = ("zip", "tar", "parquet", "hf_dataset")
# format name -> reader(path, preprocess_size=None, **options)
READERS = {"npz": _read_npz, **{fmt: _read_archive(fmt) for fmt in ARCHIVE_FORMATS}}


def detect_format(path: Path) -> str:
    """The dataset format of a file, from its first bytes (and a zip's directory): the one place formats
    are told apart."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK"):
        # npz is a zip whose members end in .npy
        import zipfile
        try:
            with open(path, "rb") as f:
                endrec = zipfile._EndRecData(f)
            if endrec and endrec[zipfile._ECD_ENTRIES_TOTAL] > 1_000_000:
                return "zip"  # not parsed here: the archive reader refuses it by its entry limit
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise AdaptationError("unsupported_format", "the file looks like a zip but cannot be opened") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        from .archives.tables import is_hf_dataset_zip

        return "hf_dataset" if is_hf_dataset_zip(names) else "zip"
    if head[:2] == b"\x1f\x8b" or (len(head) > 262 and head[257:262] == b"ustar"):
        return "tar"
    raise AdaptationError("unsupported_format", "could not detect the dataset format (expected npz, zip, tar, "
                          "parquet, or a zipped Hugging Face save_to_disk folder)")


def open_image_set(path: Path, fmt: str | None = None, *, preprocess_size: int | None = None,
                   **options) -> ImageSet:
    """Open a dataset upload. `preprocess_size` is the job's square input size: archives whose images
    differ in size are resized to it while loading (without it they are refused). Other options go to
    the archive reader (num_workers, limits...)."""
    fmt = fmt or detect_format(path)
    try:
        reader = READERS[fmt]
    except KeyError:
        raise AdaptationError("unsupported_format", f"dataset format {fmt!r} is not supported "
                              f"(supported: {', '.join(sorted(READERS))})") from None
    return reader(path, preprocess_size=preprocess_size, **options)
