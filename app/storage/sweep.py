"""Removes the blob bytes a crash abandons, once older than ADAPTD_BLOB_SWEEP_AFTER_S: unsealed blob rows
(and their chunk rows or file) of an upload or artifact write that died, files under `tmp/` nobody writes
to, and final files whose row's deletion committed before the file went. Safe beside live writers and
other sweepers (every worker runs it, worker/reaper.py): a row goes only under its lock and after a
re-check (a seal committing meanwhile wins), a file without a row can never get one (ids are never
reused; a row precedes its final file), and a live writer's temp file is younger than the grace period."""
from __future__ import annotations

import logging

from ..config import Settings
from ..db import repo
from ..db.session import session_scope
from . import files

log = logging.getLogger("adaptd.sweep")

BATCH = 500  # rows per candidate query / ids per existence query (SQLite's bound-parameter limit)


def sweep(settings: Settings) -> dict[str, int]:
    """One pass; returns how many of each kind it removed."""
    url, after = settings.resolved_database_url, settings.blob_sweep_after_s
    folder = settings.resolved_blob_dir
    removed = {"unsealed_blobs": _unsealed_blobs(url, after, with_files=folder is not None),
               "temp_files": 0, "files_without_row": 0}
    if folder is not None and folder.is_dir():
        removed["temp_files"] = _unlink(files.old_temp_files(folder, after))
        for found in files.old_final_files(folder, after, BATCH):
            with session_scope(url) as s:
                kept = repo.existing_blob_ids(s, list(found))
            removed["files_without_row"] += _unlink(p for blob_id, p in found.items() if blob_id not in kept)
    if any(removed.values()):
        log.info("swept abandoned blob bytes: %s", removed)
    return removed


def _unsealed_blobs(url: str, after: float, with_files: bool) -> int:
    with session_scope(url) as s:
        candidates = repo.unsealed_blobs(s, after, BATCH)
    n = 0
    for blob_id in candidates:
        with session_scope(url) as s:
            n += _drop_if_abandoned(s, blob_id, after, with_files)
    return n


def _drop_if_abandoned(s, blob_id: str, after: float, with_files: bool) -> bool:
    """Under the blob's lock; a file blob only where this process has the blob folder."""
    if not repo.lock_blob(s, blob_id) or not repo.abandoned_blob(s, blob_id, after):
        return False
    if repo.blob_in_file(s, blob_id):
        if not with_files:
            return False
        files.remove_after_commit(s, blob_id)
    repo.delete_blob(s, blob_id)
    return True


def _unlink(paths) -> int:
    n = 0
    for path in paths:
        try:
            path.unlink()
            n += 1
        except FileNotFoundError:  # another sweeper, or the deletion's own removal, was first
            pass
    return n
