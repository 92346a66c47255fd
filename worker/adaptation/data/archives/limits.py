"""The safety limits an archive is held to while it is indexed, before any pixel is decoded: entry
count, total and per-entry uncompressed size, per-entry and running compression ratio (zip bombs), and
the pixel count of one image. Every refusal carries a precise error code and the numbers behind it."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import AdaptationError


@dataclass(frozen=True)
class Limits:
    max_entries: int = 1_000_000
    max_total_bytes: int = 64 << 30
    max_entry_bytes: int = 1 << 30
    max_ratio: float = 200.0
    ratio_min_bytes: int = 1 << 20   # below this many bytes a high ratio is harmless (and common)

    def check_count(self, count: int, at_least: bool = False) -> None:
        if count > self.max_entries:
            raise AdaptationError("archive_too_many_entries", f"the archive holds {'more than ' if at_least else ''}"
                                  f"{self.max_entries if at_least else count} entries (limit {self.max_entries})",
                                  {"entries": count, "max_entries": self.max_entries})

    def check_total(self, total_u: int) -> None:
        if total_u > self.max_total_bytes:
            raise AdaptationError("archive_too_large", f"the archive expands to more than {self.max_total_bytes} "
                                  "bytes", {"uncompressed_bytes_at_least": total_u,
                                            "max_total_bytes": self.max_total_bytes})

    def check_entry_size(self, name: str, usize: int) -> None:
        if usize > self.max_entry_bytes:
            raise AdaptationError("archive_too_large", f"{name!r} is {usize} bytes uncompressed (limit "
                                  f"{self.max_entry_bytes} per entry)", {"entry": name, "uncompressed_bytes": usize,
                                                                          "max_entry_bytes": self.max_entry_bytes})

    def check_entry(self, name: str, usize: int, csize: int) -> None:
        self.check_entry_size(name, usize)
        if usize > self.ratio_min_bytes and usize > self.max_ratio * max(csize, 1):
            raise AdaptationError(
                "archive_compression_ratio",
                f"{name!r} expands {usize / max(csize, 1):.0f}× (limit {self.max_ratio:.0f}×): a zip bomb?",
                {"entry": name, "uncompressed_bytes": usize, "compressed_bytes": csize,
                 "max_ratio": self.max_ratio})

    def check_total_ratio(self, total_u: int, archive_bytes: int) -> None:
        if total_u > self.ratio_min_bytes and total_u > self.max_ratio * max(archive_bytes, 1):
            raise AdaptationError(
                "archive_compression_ratio",
                f"the archive expands {total_u / max(archive_bytes, 1):.0f}× in total (limit "
                f"{self.max_ratio:.0f}×): a zip bomb?",
                {"uncompressed_bytes": total_u, "archive_bytes": archive_bytes, "max_ratio": self.max_ratio})

    def check_stream(self, total_u: int, consumed: int) -> None:
        """While a compressed stream is expanded: `total_u` bytes out of `consumed` bytes in so far."""
        self.check_total(total_u)
        self.check_total_ratio(total_u, consumed)


def image_too_large(name: str, size: tuple[int, int], limit: int) -> AdaptationError:
    return AdaptationError("image_too_large", f"{name} is {size[0]}×{size[1]} pixels (limit {limit} pixels; "
                           "Pillow's decompression-bomb guard)", {"entry": name, "width": size[0],
                                                                  "height": size[1], "max_pixels": limit})
