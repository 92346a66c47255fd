"""Image archives: `zip` and `tar` (plain or gzip) of PNG, JPEG or WebP files, flat or one folder per class.

Safety: an archive is read entry by entry and no path from it is ever joined onto the filesystem
(names are only validated, sorted and turned into labels: `layout`). Before any pixel is decoded the
archive is indexed once (`index`): entry count, total uncompressed size, per-entry and total
compression ratio (zip bombs, overlapping zip entries: `limits`), path traversal, links and devices,
and every image's header (format, size, mode: `decode`) are checked, so a bad archive fails fast with a
precise code. Pixels are decoded lazily, one batch at a time (`reader`), by a torch DataLoader (worker
processes optional: `dataset`): memory stays bounded by the batches in flight, whatever the number of
images.

Random access: zip entries and plain-tar members are read at their offsets in the archive. A gzip
stream cannot be seeked, so a `.tar.gz` is decompressed once, while indexing and within the same
limits, into a temporary spill file holding only the image bytes (deleted with the set).
"""
from .dataset import ArchiveImageSet
from .index import PEEK_BYTES
from .limits import Limits

__all__ = ["PEEK_BYTES", "ArchiveImageSet", "Limits"]
