"""The file-backed blob store (ADAPTD_BLOB_DIR) on real PostgreSQL and SQLite: round trip and range reads,
one file for identical content, the file written under tmp/ and renamed at the seal, removed only after
its row's deletion commits, nothing left by an aborted writer, and chunk-row blobs still read once the
setting is on (a mixed store); the sweep of what a crash abandons (app/storage/sweep.py), and /readyz on
the blob folder."""
from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx

import pytest
from sqlalchemy import text, update

from app.checks.blobfile import open_blob
from app.config import Settings, get_settings
from app.db.migrate import upgrade_head
from app.db import repo
from app.db.models import Blob, Upload, utcnow
from app.db.session import get_engine, session_scope
from app.storage import BlobWriter, blob_file, copy_blob_to_file, delete_blob_if_unreferenced, iter_blob
from app.storage.blobs import BlobSwept
from app.storage.files import ALIGN, ContentFile, path_of, temp_of
from app.storage.sweep import sweep
from tests.private_services import wait_for
from tests.services import Service, base_env, create_pg_database, drop_pg_database

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


@pytest.mark.parametrize("piece", [MiB, 65_537])
def test_aligned_chunks_skip_the_page_cache_and_the_rest_goes_through_it(blob_dir, piece):
    """Whole 4 KiB-aligned chunks go through the O_DIRECT descriptor (where the folder's filesystem takes
    one), the others (an odd chunk size, the last piece) through the page cache; the bytes are the same."""
    blob_id = str(uuid.uuid4())
    f = ContentFile(blob_id)
    data = os.urandom(3 * MiB + 4097)
    pieces = [(i, data[i:i + piece]) for i in range(0, len(data), piece)]
    threads = [threading.Thread(target=f.store, args=p) for p in reversed(pieces)]  # out of order, at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    f.seal()
    assert path_of(blob_id).read_bytes() == data
    aligned = sum(len(b) for i, b in pieces if i % ALIGN == 0 and len(b) % ALIGN == 0)
    assert f.direct_bytes in ((aligned,) if f.direct_supported else (0,))
    assert aligned == (3 * MiB if piece == MiB else 0)


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


DAY = 24 * 3600


def age(url: str, blob_id: str | None = None, path: Path | None = None, by: float = 2 * DAY) -> None:
    """Make a blob row and/or a file look `by` seconds old (older than the sweep's default grace period)."""
    if blob_id is not None:
        with session_scope(url) as s:
            s.execute(update(Blob).where(Blob.id == blob_id).values(created_at=utcnow() - timedelta(seconds=by)))
    if path is not None:
        then = time.time() - by
        os.utime(path, (then, then))


def sweep_now(url: str, folder: Path) -> dict[str, int]:
    """A pass as a worker's reaper runs it (default grace period), on this test's database and folder."""
    return sweep(Settings(database_url=url, blob_dir=folder))


def unfinished(url: str, data: bytes) -> BlobWriter:
    w = BlobWriter(url)
    w.write(data)
    return w


def test_sweep_removes_what_a_crash_leaves_and_nothing_live(db_url, blob_dir, monkeypatch):
    settings = get_settings()
    # kept: a sealed blob an upload references (its file old), an upload in progress, a young temp file
    kept = BlobWriter(db_url)
    kept.write(os.urandom(3000))
    kept.finish(record=lambda s, blob_id: repo.add_upload(s, Upload(
        id=str(uuid.uuid4()), kind="dataset", blob_id=blob_id, size=kept.size, sha256=kept.sha256)))
    age(db_url, path=path_of(kept.blob_id))
    live = unfinished(db_url, b"x" * 5000)
    young_tmp = blob_dir / "tmp" / uuid.uuid4().hex
    young_tmp.write_bytes(b"being written")
    # (c) unsealed rows of dead writers: chunk rows; a temp file; a final file from a rolled-back seal
    monkeypatch.setattr(settings, "blob_dir", "off")
    dead_rows = unfinished(db_url, os.urandom(2 * MiB))
    monkeypatch.setattr(settings, "blob_dir", blob_dir)
    dead_tmp = unfinished(db_url, os.urandom(4000))
    dead_sealed = unfinished(db_url, os.urandom(4000))
    with pytest.raises(ZeroDivisionError):
        dead_sealed.finish(record=lambda s, blob_id: 1 / 0)
    for w in (dead_rows, dead_tmp, dead_sealed):
        age(db_url, w.blob_id)
    # (a) an orphan temp file; (b) a final file whose row's deletion committed (its removal never ran)
    orphan_tmp = blob_dir / "tmp" / uuid.uuid4().hex
    orphan_tmp.write_bytes(b"left")
    age(db_url, path=orphan_tmp)
    rowless = write(db_url, os.urandom(2000))
    with session_scope(db_url) as s:
        repo.delete_blob(s, rowless.blob_id)
    young_rowless = write(db_url, os.urandom(2000))  # the same, inside the grace period: kept for now
    with session_scope(db_url) as s:
        repo.delete_blob(s, young_rowless.blob_id)
    age(db_url, path=path_of(rowless.blob_id))
    before = set(stored_files(blob_dir))

    assert sweep_now(db_url, blob_dir) == {"unsealed_blobs": 3, "temp_files": 1, "files_without_row": 1}
    gone = {temp_of(path_of(dead_tmp.blob_id)), path_of(dead_sealed.blob_id), orphan_tmp, path_of(rowless.blob_id)}
    assert set(stored_files(blob_dir)) == before - gone
    assert set(stored_files(blob_dir)) == {path_of(kept.blob_id), temp_of(path_of(live.blob_id)), young_tmp,
                                           path_of(young_rowless.blob_id)}
    for w in (dead_rows, dead_tmp, dead_sealed):
        assert in_file(db_url, w.blob_id) is None and chunk_rows(db_url, w.blob_id) == 0
    assert sweep_now(db_url, blob_dir) == {"unsealed_blobs": 0, "temp_files": 0, "files_without_row": 0}
    live.write(b"y" * 10)
    live.finish()  # the upload in progress completes
    assert b"".join(iter_blob(db_url, live.blob_id)) == b"x" * 5000 + b"y" * 10
    assert b"".join(iter_blob(db_url, kept.blob_id)) == path_of(kept.blob_id).read_bytes()


def test_a_write_outliving_the_grace_period_fails_at_its_seal(db_url, blob_dir):
    """Swept meanwhile: the seal refuses (no reference to a missing blob), and the abort leaves nothing."""
    w = unfinished(db_url, os.urandom(1000))
    age(db_url, w.blob_id)
    assert sweep_now(db_url, blob_dir)["unsealed_blobs"] == 1
    with pytest.raises(BlobSwept):
        w.finish(record=lambda s, blob_id: pytest.fail("recorded a swept blob"))
    w.abort()
    assert stored_files(blob_dir) == [] and in_file(db_url, w.blob_id) is None


def lock_waiters(url: str) -> int:
    """PostgreSQL backends of this database waiting for a lock (a fresh transaction: pg_stat_activity is
    read once per transaction)."""
    with session_scope(url) as s:
        return s.execute(text("select count(*) from pg_stat_activity where datname = current_database() "
                              "and wait_event_type = 'Lock'")).scalar()


def test_a_seal_in_progress_wins_over_the_sweep(db_url, blob_dir):
    """An old unsealed blob whose seal is under way: the sweep waits for the blob's lock (PostgreSQL: seen
    waiting; SQLite: the write lock), then finds it sealed and leaves it, file and all."""
    w = unfinished(db_url, os.urandom(3000))
    age(db_url, w.blob_id)
    with session_scope(db_url) as s:
        assert w.seal(s) == w.blob_id  # row locked, sha256 set, file renamed: not committed yet
        result = {}
        sweeper = threading.Thread(target=lambda: result.update(sweep_now(db_url, blob_dir)))
        sweeper.start()
        if db_url.startswith("postgresql"):
            wait_for(lambda: lock_waiters(db_url) == 1, 30, message="the sweep waiting for the blob's lock")
    sweeper.join()
    assert result["unsealed_blobs"] == 0
    assert stored_files(blob_dir) == [path_of(w.blob_id)]
    assert b"".join(iter_blob(db_url, w.blob_id)) == path_of(w.blob_id).read_bytes()


def test_the_reaper_sweeps(db_url, blob_dir):
    """worker/reaper.py runs the sweep on its first round (then every ADAPTD_BLOB_SWEEP_INTERVAL_S)."""
    from worker.reaper import Reaper

    leftover = blob_dir / "tmp" / uuid.uuid4().hex
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"left")
    age(db_url, path=leftover)
    reaper = Reaper(Settings(database_url=db_url, blob_dir=blob_dir, reaper_interval_s=0.05), celery=None)
    reaper.start()
    try:
        wait_for(lambda: not leftover.exists(), 30, interval=0.05, message="the reaper's sweep")
    finally:
        reaper.stop()
        reaper.join()


def test_readyz_reports_an_unusable_blob_folder(tmp_path):
    """A real API process (embedded: SQLite, filesystem broker): the folder checked on each request."""
    volume = tmp_path / "volume"
    volume.write_text("a file where the folder's parent should be")
    service = Service(env=base_env(ADAPTD_HOME=str(tmp_path / "home"), ADAPTD_BLOB_DIR=str(volume / "blobs")),
                      log_dir=tmp_path)
    (tmp_path / "home").mkdir()

    def blob_check() -> str:
        r = httpx.get(f"{service.url}/readyz", timeout=10)
        assert r.status_code == 503  # no worker either
        return r.json()["error"]["detail"]["checks"]["blob_folder"]

    try:
        service.start_api()
        assert blob_check() == ("error: the blob folder (ADAPTD_BLOB_DIR) is missing and cannot be created "
                                "(NotADirectoryError)")
        volume.unlink()
        volume.mkdir()
        (volume / "blobs").write_text("not a folder")
        assert blob_check().startswith("error: the blob folder (ADAPTD_BLOB_DIR) is not a folder")
        (volume / "blobs").unlink()
        assert blob_check() == "ok"
        assert list((volume / "blobs" / "tmp").iterdir()) == []  # the probe file is gone
    finally:
        service.stop()


def test_an_upload_outliving_the_grace_period_is_refused_precisely(db_url, blob_dir):
    """The HTTP side of the above: a 408 `upload_expired` telling the client to send again, nothing left."""
    from app.errors import ApiError
    from app.services.uploads import store_stream

    async def slow_client():
        yield os.urandom(1000)
        with session_scope(db_url) as s:  # the rest arrives after the grace period: the sweep ran meanwhile
            s.execute(update(Blob).where(Blob.sha256.is_(None)).values(created_at=utcnow() - timedelta(days=2)))
        assert sweep_now(db_url, blob_dir)["unsealed_blobs"] == 1
        yield os.urandom(1000)

    with pytest.raises(ApiError) as refused:
        asyncio.run(store_stream(Settings(database_url=db_url, blob_dir=blob_dir), "tenant-slow", "data", None,
                                 slow_client()))
    assert (refused.value.code, refused.value.status) == ("upload_expired", 408)
    assert stored_files(blob_dir) == []
