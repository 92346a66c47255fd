"""The public set over an image archive: opened (indexed within its limits) once, then decoded lazily,
one batch at a time, in-process or by torch DataLoader worker processes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ...errors import AdaptationError
from ..formats import ARCHIVE_FORMATS, detect_format
from .index import Spill, build_index, list_tar, list_zip
from .limits import Limits
from .tables import list_hf_dataset, list_parquet
from .reader import Reader

MIN_BATCHES_FOR_WORKERS = 4      # fewer batches than this: decode in-process (worker start-up costs more)


def _default_workers() -> int:
    env = os.environ.get("ADAPTD_LOADER_WORKERS")
    if env is not None and env.strip() != "":
        try:
            return max(0, int(env))
        except ValueError:
            raise AdaptationError("invalid_configuration",
                                  f"ADAPTD_LOADER_WORKERS must be an integer, got {env!r}") from None
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: `ds[array_of_indices]` -> ("ok", uint8 NHWC).

    Errors come back as values, not exceptions: the DataLoader cannot re-raise an AdaptationError
    (it rebuilds exceptions from a message only), and the code must survive the trip."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.index.names)

    def __getitem__(self, indices):
        try:
            return ("ok", torch.from_numpy(self.reader.load_batch(np.asarray(indices))))
        except AdaptationError as exc:
            return ("error", exc.code, exc.message, exc.detail)


def _identity(x):
    return x


class ArchiveImageSet:
    """An ImageSet over a zip or tar(.gz) archive of PNG/JPEG/WebP images (a WebDataset shard is a tar),
    or over a Hugging Face `datasets` export: `parquet`, or `hf_dataset` (a zipped save_to_disk folder).

    `preprocess_size`: the job's square input size; images of different sizes are resized to it on the
    CPU (Pillow, bilinear with antialiasing) so batches stack. Without it, mixed sizes are refused, or with
    `pad_mixed_sizes` (detection) padded at the bottom and right to the largest (pixels keep their place).
    Same-size images are returned as stored (the device resizes batches).

    `masks` (segmentation jobs): a zip or tar holds `images/NAME.ext` and, optionally, `masks/NAME.png`
    (L or palette PNG, value = class, 255 = ignore); `labels` are then the N×H×W masks, decoded once
    while opening (app/checks/archive_names.py: the layout). Otherwise a COCO annotation file beside the
    images makes `labels` the box labels (archives/coco.py) and `category_mapping` their mapping."""

    def __init__(self, path: Path | str, fmt: str | None = None, *, preprocess_size: int | None = None,
                 num_workers: int | None = None, prefetch_factor: int = 2, pin_memory: bool = False,
                 multiprocessing_context: str | None = None,
                 max_entries: int = 1_000_000, max_total_bytes: int = 64 << 30,
                 max_entry_bytes: int = 1 << 30, max_ratio: float = 200.0, ratio_min_bytes: int = 1 << 20,
                 max_pixels: int | None = None, spill_dir: str | None = None, masks: bool = False,
                 pad_mixed_sizes: bool = False):
        self.path = Path(path)
        self.format = fmt or detect_format(self.path)
        if self.format not in ARCHIVE_FORMATS:
            raise AdaptationError("unsupported_format", f"not an image archive format: {self.format!r}")
        if preprocess_size is not None and int(preprocess_size) <= 0:
            raise AdaptationError("invalid_preprocess", f"preprocess size must be positive, got {preprocess_size}")
        self.preprocess_size = preprocess_size
        self.num_workers = _default_workers() if num_workers is None else max(0, int(num_workers))
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.limits = Limits(max_entries=max_entries, max_total_bytes=max_total_bytes,
                             max_entry_bytes=max_entry_bytes, max_ratio=max_ratio, ratio_min_bytes=ratio_min_bytes)
        # Pillow's own decompression-bomb guard stays on; this limit also holds if someone disabled it.
        self.max_pixels = int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485)
        self.notes: list[str] = []
        self._spill: Spill | None = None

        ignored, class_names = 0, None
        if self.format == "zip":
            entries, ignored = list_zip(self.path, self.limits)
            kind, source = "zip", str(self.path)
        elif self.format == "tar":
            entries, ignored, self._spill = list_tar(self.path, self.limits, self.max_pixels, spill_dir)
            kind, source = "raw", self._spill.path if self._spill else str(self.path)
        else:
            list_table = list_parquet if self.format == "parquet" else list_hf_dataset
            entries, self._spill, class_names, notes = list_table(self.path, self.limits, spill_dir)
            self.notes.extend(notes)
            kind, source = "raw", self._spill.path
        try:
            index, self.labels, self.class_names, self.category_mapping = build_index(
                entries, ignored, kind, source, max_pixels=self.max_pixels, preprocess_size=preprocess_size,
                notes=self.notes, class_names=class_names, masks=masks and self.format in ("zip", "tar"),
                pad_mixed_sizes=pad_mixed_sizes)
        except BaseException:
            self.close_spill()
            raise
        self._index = index
        self._reader = Reader(index)

    # -- ImageSet protocol --
    def __len__(self) -> int:
        return len(self._index.names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every decoded image."""
        return self._index.out_hw

    @property
    def image_sizes(self) -> np.ndarray:
        """int64 N×2: the (height, width) each image's pixels take in the arrays `batches` yields, from their
        top-left corner (the rest is padding, `pad_mixed_sizes`); resized images take the whole array."""
        ix = self._index
        if ix.resize.any():
            return np.where(ix.resize[:, None], np.asarray(ix.out_hw, np.int64),
                            np.stack([ix.heights, ix.widths], 1)).astype(np.int64)
        return np.stack([ix.heights, ix.widths], 1).astype(np.int64)

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
                yield torch.from_numpy(self._reader.load_batch(chunk)), torch.from_numpy(chunk)
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
                yield torch.from_numpy(self._reader.load_batch(chunk)), torch.from_numpy(chunk)
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
        self.close_spill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close_spill(self) -> None:
        if self._spill is not None:
            self._spill.remove()
