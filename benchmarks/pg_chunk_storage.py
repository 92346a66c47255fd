"""PostgreSQL's own CPU per GiB for storing incompressible blob chunks, several ways, without the API:
one connection (synchronous_commit off, as app.db.session's chunk pool) inserts --mib MiB of random
chunks into a table shaped like blob_chunks. Variants: INSERT with the column's default storage
(EXTENDED: a pglz compression attempt per chunk) or STORAGE EXTERNAL (migration 0006), and binary COPY
(one per chunk, or one for all). Counts the backend's CPU and the server's WAL writer, checkpointer and
background writer, and this client's.

    python benchmarks/pg_chunk_storage.py [--mib 128] [--chunk-kib 1024] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import psutil
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.services import PG_ADMIN_URL  # noqa: E402

TABLE = 'create table bc (blob_id varchar(36) not null, seq int not null, "offset" bigint not null, ' \
        'data bytea not null, primary key (blob_id, seq))'
COPY = 'copy bc (blob_id, seq, "offset", data) from stdin (format binary)'


def insert(conn, blob, chunks):
    for i, (offset, data) in enumerate(chunks):
        conn.execute('insert into bc (blob_id, seq, "offset", data) values (%s, %s, %s, %s)', (blob, i, offset, data))


def copy_each(conn, blob, chunks):
    with conn.cursor() as cur:
        for i, (offset, data) in enumerate(chunks):
            with cur.copy(COPY) as cp:
                cp.set_types(["varchar", "int4", "int8", "bytea"])
                cp.write_row((blob, i, offset, data))


def copy_all(conn, blob, chunks):
    with conn.cursor() as cur, cur.copy(COPY) as cp:
        cp.set_types(["varchar", "int4", "int8", "bytea"])
        for i, (offset, data) in enumerate(chunks):
            cp.write_row((blob, i, offset, data))


VARIANTS = (("INSERT, EXTENDED (default)", "extended", insert), ("INSERT, EXTERNAL", "external", insert),
            ("COPY binary per chunk, EXTERNAL", "external", copy_each),
            ("COPY binary, one for all chunks, EXTERNAL", "external", copy_all))


def cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run(db: str, storage: str, store, args) -> str:
    chunk = args.chunk_kib * 1024
    template = os.urandom(chunk)
    chunks = ((i * chunk, template[:-8] + i.to_bytes(8, "little")) for i in range(args.mib * 1024 // args.chunk_kib))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("drop table if exists bc")
        conn.execute(TABLE)
        conn.execute(f"alter table bc alter column data set storage {storage}")
        conn.execute("set synchronous_commit = off")
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            pids = [conn.info.backend_pid] + [r[0] for r in admin.execute(
                "select pid from pg_stat_activity where backend_type in "
                "('walwriter', 'checkpointer', 'background writer')")]
        me = psutil.Process()
        c0, m0, t0 = cpu(pids), sum(me.cpu_times()[:2]), time.perf_counter()
        store(conn, str(uuid.uuid4()), chunks)
        wall = time.perf_counter() - t0
        c1, m1 = cpu(pids), sum(me.cpu_times()[:2])
    gib = args.mib / 1024
    return f"{args.mib / wall:.0f} | {(c1 - c0) / gib:.2f} | {(m1 - m0) / gib:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=128)
    p.add_argument("--chunk-kib", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    name = f"adaptd_chunks_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    db = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average {os.getloadavg()[0]:.1f}; {args.mib} MiB in "
          f"{args.chunk_kib} KiB chunks per row\n")
    print("| round | variant | MiB/s | PostgreSQL CPU s/GiB | client CPU s/GiB |\n|---:|---|---:|---:|---:|")
    try:
        for r in range(args.rounds):  # interleaved: background load drifts over all variants alike
            for label, storage, store in VARIANTS:
                print(f"| {r + 1} | {label} | {run(db, storage, store, args)} |", flush=True)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'drop database "{name}" with (force)')
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
