"""The file-backed blob store (ADAPTD_BLOB_DIR) on real PostgreSQL and SQLite: round trip and range reads,
one file for identical content, the file written under tmp/ and renamed at the seal, removed only after
its row's deletion commits, nothing left by an aborted writer, and chunk-row blobs still read once the
setting is on (a mixed store)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from app.checks.blobfile import open_blob
from app.config import Settings, get_settings
from app.db.migrate import upgrade_head
from app.db.session import get_engine, session_scope
from app.storage import BlobWriter, blob_file, copy_blob_to_file, delete_blob_if_unreferenced, iter_blob
from app.storage.files import path_of
from tests.services import create_pg_database, drop_pg_database

MiB = 1 << 20


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def db_url(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('blob-files') / 'adaptd.db'}"
        upgrade_head(url)
        yield url
        return
    name, url = create_pg_database()
    upgrade_head(url)
    yield url
    get_engine(url).dispose()
    drop_pg_database(name)


@pytest.fixture
def blob_dir(tmp_path, monkeypatch):
    folder = tmp_path / "blobs"
    monkeypatch.setattr(get_settings(), "blob_dir", folder)
    return folder


def stored_files(folder) -> list:
    """Every file in the blob folder, sealed or not."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write(url: str, data: bytes, piece: int = MiB) -> BlobWriter:
    """A sealed, unreferenced blob: the first pieces stored from the event loop, the rest in place."""
    w = BlobWriter(url)
    half = len(data) // 2

    async def stream():
        for i in range(0, half, piece):
            await w.write_async(data[i:min(i + piece, half)])
        await w.flush()

    asyncio.run(stream())
    for i in range(half, len(data), piece):
        w.write(data[i:i + piece])
    w.finish()
    return w


def in_file(url: str, blob_id: str) -> bool:
    with session_scope(url) as s:
        return s.execute(text("select in_file from blobs where id = :i"), {"i": blob_id}).scalar()


def chunk_rows(url: str, blob_id: str) -> int:
    with session_scope(url) as s:
        return s.execute(text("select count(*) from blob_chunks where blob_id = :i"), {"i": blob_id}).scalar()


def test_file_round_trip_and_ranges(db_url, blob_dir, tmp_path):
    data = os.urandom(2 * MiB + 12345)
    w = write(db_url, data, piece=300_000)
    assert in_file(db_url, w.blob_id) and chunk_rows(db_url, w.blob_id) == 0
    assert stored_files(blob_dir) == [path_of(w.blob_id)] == [blob_file(db_url, w.blob_id)]
    assert path_of(w.blob_id).read_bytes() == data and w.sha256 and w.size == len(data)
    assert b"".join(iter_blob(db_url, w.blob_id)) == data
    n = len(data)
    for start, end in [(0, 1), (5, MiB + 7), (MiB - 3, 2 * MiB + 3), (n - 1, n), (n, n), (17, None)]:
        assert b"".join(iter_blob(db_url, w.blob_id, start, end)) == data[start:end], (start, end)
    assert copy_blob_to_file(db_url, w.blob_id, tmp_path / "copy") == n
    assert (tmp_path / "copy").read_bytes() == data
    with open_blob(db_url, w.blob_id, n) as f:
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]


def test_identical_content_is_one_file(db_url, blob_dir):
    data = os.urandom(MiB + 1)
    first, second = write(db_url, data), BlobWriter(db_url)
    second.write(data)
    blob_id, digest, size = second.finish()
    assert blob_id == first.blob_id and size == len(data)
    assert stored_files(blob_dir) == [path_of(first.blob_id)]  # the copy and its temporary file are gone


def test_deleting_removes_the_file_only_after_the_commit(db_url, blob_dir):
    w = write(db_url, os.urandom(1000))
    path = path_of(w.blob_id)
    with pytest.raises(ZeroDivisionError), session_scope(db_url) as s:
        assert delete_blob_if_unreferenced(s, w.blob_id)
        assert path.exists()  # not before the commit ...
        1 / 0
    assert path.exists() and in_file(db_url, w.blob_id)  # ... and not at all when it rolls back
    with session_scope(db_url) as s:
        assert delete_blob_if_unreferenced(s, w.blob_id)
        assert path.exists()
    assert not path.exists() and in_file(db_url, w.blob_id) is None
    assert stored_files(blob_dir) == []


def test_aborted_writer_leaves_nothing(db_url, blob_dir):
    w = BlobWriter(db_url)
    w.write(os.urandom(5000))
    assert stored_files(blob_dir) == [blob_dir / "tmp" / path_of(w.blob_id).name]
    w.abort()
    assert stored_files(blob_dir) == [] and in_file(db_url, w.blob_id) is None
    # a seal whose transaction rolls back: the file had its final name, the writer's abort removes it
    w = BlobWriter(db_url)
    w.write(os.urandom(5000))
    with pytest.raises(ZeroDivisionError):
        w.finish(record=lambda s, blob_id: 1 / 0)
    assert stored_files(blob_dir) == [path_of(w.blob_id)]
    w.abort()
    assert stored_files(blob_dir) == [] and in_file(db_url, w.blob_id) is None


def test_chunk_blobs_still_read_after_the_setting_is_turned_on(db_url, blob_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(get_settings(), "blob_dir", "off")
    data = os.urandom(2 * MiB + 99)
    old = write(db_url, data)
    assert not in_file(db_url, old.blob_id) and chunk_rows(db_url, old.blob_id) > 1
    monkeypatch.setattr(get_settings(), "blob_dir", blob_dir)
    new = write(db_url, os.urandom(10))
    assert in_file(db_url, new.blob_id) and stored_files(blob_dir) == [path_of(new.blob_id)]
    assert b"".join(iter_blob(db_url, old.blob_id)) == data
    assert b"".join(iter_blob(db_url, old.blob_id, MiB - 1, MiB + 2)) == data[MiB - 1:MiB + 2]
    assert copy_blob_to_file(db_url, old.blob_id, tmp_path / "old") == len(data)
    with session_scope(db_url) as s:
        assert delete_blob_if_unreferenced(s, old.blob_id)
    assert chunk_rows(db_url, old.blob_id) == 0 and stored_files(blob_dir) == [path_of(new.blob_id)]
    monkeypatch.setattr(get_settings(), "blob_dir", "off")
    with pytest.raises(RuntimeError, match="no blob folder"):  # a file blob needs its folder
        b"".join(iter_blob(db_url, new.blob_id))


def test_blob_dir_setting():
    """Embedded mode (no database URL) keeps blobs in `home`/blobs; a configured database, chunk rows unless
    ADAPTD_BLOB_DIR names a folder; `off` is chunk rows everywhere; an empty value is unset."""
    home = Path("/srv/adaptd-home")
    assert Settings(home=home).resolved_blob_dir == home / "blobs"
    assert Settings(home=home, database_url="postgresql://h/db").resolved_blob_dir is None
    assert Settings(home=home, database_url="postgresql://h/db", blob_dir="/b").resolved_blob_dir == Path("/b")
    assert Settings(home=home, blob_dir="off").resolved_blob_dir is None
    assert Settings(home=home, blob_dir="").resolved_blob_dir == home / "blobs"
    with pytest.raises(ValueError, match="absolute"):
        Settings(blob_dir="blobs")


def test_file_names_come_from_uuids_only(blob_dir):
    for bad in ("../../etc/passwd", "a/b", ""):
        with pytest.raises(ValueError):
            path_of(bad)
    assert path_of("12345678-1234-5678-1234-567812345678") == blob_dir / "12" / "12345678123456781234567812345678"
