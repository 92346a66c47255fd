"""The image-set interface the engine adapts on, and the format dispatch (formats: formats.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from ..errors import AdaptationError
from . import boxes
from .formats import ARCHIVE_FORMATS, detect_format


class ImageSet(Protocol):
    """A finite, ordered set of uint8 images (N×H×W×C), optionally labelled."""

    # int64 (N,) class labels, uint8 (N, H, W) masks, a dict of box arrays (data/boxes.py), or None
    labels: np.ndarray | dict | None
    class_names: list[str] | None    # label index -> name, when the format carries names
    # int64 N×2: the (height, width) each image's pixels take in the batches, from their top-left corner
    # (smaller than the batch's size where images of several sizes are padded: detection)
    image_sizes: np.ndarray

    def __len__(self) -> int: ...

    @property
    def names(self) -> list[str]:
        """Each image's name in stored order (an archive's paths; an npz's indices), e.g. to match a prior
        file's rows."""
        ...

    def batches(self, batch_size: int, order: np.ndarray | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (uint8 NHWC tensor, int64 index tensor) in `order` (default: stored order)."""
        ...


class ArrayImageSet:
    """An in-memory uint8 array (npz). Batches are zero-copy slices."""

    def __init__(self, x: np.ndarray, y: np.ndarray | dict | None = None, class_names: list[str] | None = None):
        if x.ndim == 3:
            x = x[..., None]
        self.x = x
        self.labels = y
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_sizes(self) -> np.ndarray:
        return np.tile(np.asarray(self.x.shape[1:3], np.int64), (len(self.x), 1))

    @property
    def names(self) -> list[str]:
        return [str(i) for i in range(len(self.x))]

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


def check_npz_members(path: Path) -> None:
    """Refuse an npz whose members would inflate past the archive limits (archives/limits.py), from the
    zip directory alone, before numpy decompresses anything: a member's declared size bounds what
    zipfile will inflate for it."""
    import zipfile

    from .archives.limits import Limits

    limits = Limits()
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AdaptationError("invalid_dataset", f"not a readable npz file: {exc}") from None
    limits.check_count(len(infos))
    for info in infos:
        limits.check_entry(info.filename, info.file_size, info.compress_size)
    total_u = sum(i.file_size for i in infos)
    limits.check_total(total_u)
    limits.check_total_ratio(total_u, sum(i.compress_size for i in infos))


def read_npz(path: Path) -> ArrayImageSet:
    """`x`: uint8 N×H×W[×C]; optional `y`: integer labels, or `boxes`/`labels`/`image_index` (detection,
    data/boxes.py). Read without pickle, after check_npz_members."""
    check_npz_members(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise AdaptationError("invalid_dataset", f"npz has no 'x' array (found: {archive.files})")
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
            box_arrays = ({k: archive[k] for k in boxes.BOX_KEYS if k in archive.files}
                          if "boxes" in archive.files else None)
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
    if box_arrays:
        if y is not None:
            raise AdaptationError("invalid_dataset", "an npz holds either 'y' or box labels "
                                  "('boxes', 'labels', 'image_index'), not both")
        y = boxes.checked(box_arrays, np.tile(np.asarray(x.shape[1:3], np.int64), (len(x), 1)))
    elif y is not None:
        if not np.issubdtype(y.dtype, np.integer):
            raise AdaptationError("invalid_dataset", f"'y' must hold integers, got {y.dtype}")
        if y.ndim == 3:  # segmentation masks, one per image (255 = ignore)
            if y.shape != x.shape[:3]:
                raise AdaptationError("mask_size_mismatch", f"'y' masks must be N×H×W like the images "
                                      f"{list(x.shape[:3])}, got {list(y.shape)}",
                                      {"images": list(x.shape[:3]), "masks": list(y.shape)})
            if y.min() < 0 or y.max() > 255:
                raise AdaptationError("invalid_dataset", "mask values must lie in 0..255 (255 = ignore)")
            y = y.astype(np.uint8)
        elif y.shape != (len(x),):
            raise AdaptationError("invalid_dataset", f"'y' must be {len(x)} integer labels (or N×H×W masks), "
                                  f"got {y.dtype}{y.shape}")
        else:
            y = y.astype(np.int64)
    return ArrayImageSet(x, y)


def _read_npz(path: Path, **_options) -> ArrayImageSet:
    return read_npz(path)  # arrays share one size: preprocess_size and loader options do not apply


def _read_archive(fmt: str):
    def read(path: Path, **options) -> ImageSet:
        from .archives import ArchiveImageSet  # Pillow (and pyarrow for tables) imported only when read

        return ArchiveImageSet(path, fmt, **options)
    return read


# format name -> reader(path, preprocess_size=None, **options)
READERS = {"npz": _read_npz, **{fmt: _read_archive(fmt) for fmt in ARCHIVE_FORMATS}}


def open_image_set(path: Path, fmt: str | None = None, *, preprocess_size: int | None = None,
                   **options) -> ImageSet:
    """Open a dataset upload. `preprocess_size` is the job's square input size: archives whose images
    differ in size are resized to it while loading (without it they are refused). Other options go to
    the archive reader (num_workers, limits, `masks` for a segmentation archive...)."""
    fmt = fmt or detect_format(path)
    try:
        reader = READERS[fmt]
    except KeyError:
        raise AdaptationError("unsupported_format", f"dataset format {fmt!r} is not supported "
                              f"(supported: {', '.join(sorted(READERS))})") from None
    return reader(path, preprocess_size=preprocess_size, **options)
