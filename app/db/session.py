"""Engine and session factory, one per database URL."""
from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


# Pages of a new SQLite file (an existing file keeps its own): blob chunks span many pages, and each
# page is a write (and a checkpoint copy) of its own; 64 KiB pages took a 1 MiB chunk's system time
# from 7.4 to 2.2 CPU s/GiB (BENCHMARKS.md, Uploads).
SQLITE_PAGE_SIZE = 65536


# Every engine made here, so that a forked child can drop the pools it inherited.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _made(engine: Engine) -> Engine:
    _ENGINES.add(engine)
    return engine


def _forget_inherited_pools() -> None:
    """In a forked child (a Celery pool process that replaces one that died, forked after the worker's
    main process has used the database for its reaper and presence rows): the pooled connections are
    the parent's sockets, and two processes on one socket corrupt each other's transactions ("can't
    change 'autocommit' now", "server closed the connection"). The child starts fresh pools; the
    parent's connections stay open for the parent (dispose(close=False), as SQLAlchemy prescribes)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_pools)


def set_sqlite_page_size(dbapi_conn) -> None:
    """Before the file's first table (a no-op afterwards)."""
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
    cur.close()


def _sqlite_engine(url: str, synchronous: str, **options) -> Engine:
    # As many connections as PostgreSQL's pool: writers queue on SQLite's lock (busy_timeout), and a
    # request must not wait for a pooled connection instead (20 simultaneous submits: a pool of 5 + 10
    # ran dry and answered 503).
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                           max_overflow=30, pool_timeout=30, **options)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(conn, _record):  # WAL: the API reads while the worker writes
        set_sqlite_page_size(conn)
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    return _made(engine)


@lru_cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, "FULL")
    # More connections than the API's threadpool (anyio: 40 threads), so a request never waits for one.
    return _made(create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=30, pool_timeout=10))


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Commit at the boundary, roll back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@lru_cache
def get_read_engine(url: str) -> Engine:
    """The same pool in autocommit: a read that needs no transaction is one round trip (no BEGIN, no
    COMMIT) and no ORM session (no identity map to build and throw away per request)."""
    return get_engine(url).execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def read_scope(url: str) -> Iterator[Connection]:
    """A pooled connection for single-statement reads (each statement sees committed data)."""
    with get_read_engine(url).connect() as conn:
        yield conn


@lru_cache
def get_async_read_engine(url: str):
    """PostgreSQL reads on the event loop (psycopg's async driver): no thread hand-off, so no wait for
    the GIL between the network reply and the response. No pre-ping: a connection that died with the
    server fails its request with 503 (app.errors) and SQLAlchemy then drops the whole pool, so one
    request per process pays for a restart instead of every request paying a round trip."""
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, pool_size=10, max_overflow=10, pool_timeout=10,
                                 isolation_level="AUTOCOMMIT")
    _made(engine.sync_engine)
    return engine


async def read(url: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(connection, *args)` for a read of one or two statements, from async code without the
    threadpool: on PostgreSQL through the async engine; on SQLite in place (a local indexed read takes
    microseconds and WAL readers never wait for the writer)."""
    if url.startswith("sqlite"):
        with read_scope(url) as conn:
            return fn(conn, *args)
    async with get_async_read_engine(url).connect() as conn:
        return await conn.run_sync(fn, *args)


@lru_cache
def get_deferred_durability_engine(url: str) -> Engine:
    """A pool of its own for rows that count once a later ordinary commit refers to them, such as blob
    chunks before their blob is sealed: autocommit (each statement its own transaction, one round
    trip), and commits that do not wait for the disk (PostgreSQL: synchronous_commit off for these
    sessions; SQLite in WAL mode: synchronous=NORMAL). The log is written in order, so the later
    commit's flush makes them durable too, and a crash before it leaves an unsealed blob that nothing
    refers to. No pre-ping (a round trip per checkout): after a server restart one statement fails
    (503) and SQLAlchemy drops the pool. Connections are taken per statement, so concurrent uploads
    share the pool instead of holding one each."""
    if url.startswith("sqlite"):
        return _sqlite_engine(url, "NORMAL", isolation_level="AUTOCOMMIT")
    return _made(create_engine(url, pool_size=10, max_overflow=30, pool_timeout=30, isolation_level="AUTOCOMMIT",
                               connect_args={"options": "-c synchronous_commit=off"}))
