"""A forked child (a Celery pool process replacing one that died) does not reuse the connections its
parent pooled: it would share the parent's socket, and both sides' transactions break."""
from __future__ import annotations

import os

from sqlalchemy import text

from app.db.session import get_engine
from tests.services import create_pg_database, drop_pg_database


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("select pg_backend_pid()")).scalar()


def test_forked_child_opens_its_own_connections():
    name, url = create_pg_database()
    try:
        engine = get_engine(url)
        parent = _backend_pid(engine)  # now pooled in this process
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child: report its connection's server process, then leave at once
            try:
                os.write(write, str(_backend_pid(engine)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as r:
            in_child = int(r.read() or 0)
        os.waitpid(child, 0)
        assert in_child and in_child != parent
        assert _backend_pid(engine) == parent  # the parent's pooled connection still works
        engine.dispose()
    finally:
        drop_pg_database(name)
