"""Blob store: content-addressed bytes in the database, streamed in chunks both ways."""
from .blobs import BlobWriter, copy_blob_to_file, delete_blob_if_unreferenced, iter_blob

__all__ = ["BlobWriter", "copy_blob_to_file", "delete_blob_if_unreferenced", "iter_blob"]
