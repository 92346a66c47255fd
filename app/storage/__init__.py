"""Blob store: content-addressed bytes in the database or in files of ADAPTD_BLOB_DIR, streamed in chunks
both ways."""
from .blobs import BlobSwept, BlobWriter, blob_file, copy_blob_to_file, delete_blob_if_unreferenced, iter_blob

__all__ = ["BlobSwept", "BlobWriter", "blob_file", "copy_blob_to_file", "delete_blob_if_unreferenced", "iter_blob"]
