"""Engine and session factory, one per database URL."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")


@lru_cache
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # As many connections as PostgreSQL's pool: writers queue on SQLite's lock (busy_timeout), and a
        # request must not wait for a pooled connection instead (20 simultaneous submits: a pool of 5 + 10
        # ran dry and answered 503).
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=30, pool_timeout=30)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # WAL: the API reads while the worker writes
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    # More connections than the API's threadpool (anyio: 40 threads), so a request never waits for one.
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=30, pool_timeout=10)


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

    return create_async_engine(url, pool_size=10, max_overflow=10, pool_timeout=10,
                               isolation_level="AUTOCOMMIT")


async def read(url: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(connection, *args)` for a read of one or two statements, from async code without the
    threadpool: on PostgreSQL through the async engine; on SQLite in place (a local indexed read takes
    microseconds and WAL readers never wait for the writer)."""
    if url.startswith("sqlite"):
        with read_scope(url) as conn:
            return fn(conn, *args)
    async with get_async_read_engine(url).connect() as conn:
        return await conn.run_sync(fn, *args)


@contextmanager
def deferred_durability_scope(url: str) -> Iterator[Connection]:
    """A transaction whose commit does not wait for the disk (PostgreSQL: synchronous_commit off for
    it; SQLite in WAL mode: synchronous=NORMAL while it commits). Only for rows that count once a later
    ordinary commit refers to them, such as blob chunks before their blob is sealed: the log is
    written in order, so that later commit's flush makes them durable too, and a crash before it
    leaves an unsealed blob that nothing refers to."""
    engine = get_engine(url)
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
            conn.commit()  # ends SQLAlchemy's autobegun transaction (SQLite opened none for a PRAGMA)
        try:
            with conn.begin():
                if not sqlite:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield conn
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA synchronous=FULL")
                conn.commit()
