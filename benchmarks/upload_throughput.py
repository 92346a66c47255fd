"""Upload throughput over HTTP on loopback, and where its time goes, for both backends and both blob stores,
in one run.

For each backend (PostgreSQL as `adaptd api`; SQLite as `adaptd up`) and blob store (`rows`: chunk rows in
the database, ADAPTD_BLOB_DIR=off; `files`: ADAPTD_BLOB_DIR, a folder in the run's temporary directory) on a
fresh database:

    sha256            hashing the bytes alone (hashlib, this process): the floor of the server's work
    blob store        app.storage.BlobWriter in this process, no HTTP: chunk inserts + commits + hashing
    HTTP x1           one client uploading --mib MiB (octet-stream, streamed), --repeat times
    HTTP x4           four clients uploading --mib / 4 MiB each at once

Every upload has distinct bytes (no deduplication). `--delete` deletes each upload once it is measured, so
later uploads reuse the memory its pages had: on this VM, writing into memory the guest has never touched
costs the kernel ~3 CPU s/GiB instead of ~0.3 (BENCHMARKS.md, Uploads, file store), as on a fresh machine
and unlike one whose memory is already in use as page cache. Prints MiB/s and MB/s per row, the API's peak RSS
during the HTTP rows (memory must stay bounded: it may not grow with the upload size), and the CPU
seconds per GiB of the API, the database server (the PostgreSQL backends of this run's database and the
server's WAL writer, checkpointer and background writer; the server may be shared) and the client. On a shared
machine the wall-clock rate mostly says how much CPU the run was given; CPU per GiB does not depend on
that, and gives the rate the API and the database could sustain with a core each.

    python benchmarks/upload_throughput.py [--backend postgres,sqlite] [--store rows,files] [--mib 256]
        [--repeat 2] [--delete] [--profile DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from api_ratio import Stack  # noqa: E402
from load import CpuSampler, cpu_model, postgres_pids_of  # noqa: E402

MiB = 1 << 20


def body(template: bytes, mib: int, tag: str):
    """`mib` MiB in 1 MiB pieces, distinct from every other upload (a tag in front)."""
    head = tag.encode().ljust(64, b"-")
    yield head + template[len(head):MiB]
    for _ in range(mib - 1):
        yield template


class PeakRss:
    def __init__(self, pids):
        self.pids, self.peak, self._stop = pids, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.wait(0.05):
            total = 0
            for pid in self.pids():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def wall_profile(pid: int, out: Path) -> subprocess.Popen:
    """py-spy on every thread of `pid`, idle time included, for a few seconds (SIGINT ends it early)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen([exe, "record", "-p", str(pid), "-d", "4", "-r", "200", "-f", "raw", "--idle",
                            "--threads", "-o", str(out), "--nonblocking"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the upload starts
    return spy


# What a sample of an API thread was doing: the first activity whose frame is in its stack.
ACTIVITIES = (("idle pool thread", "Queue.get"), ("waiting for the database", "Connection.wait"),
              ("sending a chunk to the database", "_send_query"), ("storing a chunk (the insert call)", "_store"),
              ("event loop: receiving (uvicorn, httptools)", "data_received"),
              ("event loop: store_stream (joining chunks)", "store_stream"))


def activity(frames: list[str]) -> str:
    if "EpollSelector.select" in frames[-1]:
        return "event loop: waiting for the client's bytes"
    if frames[-1].startswith("WorkerThread.run"):  # a C call straight from the pool thread: hashlib
        return "hashing"
    stack = ";".join(frames)
    return next((name for name, mark in ACTIVITIES if mark in stack), "other")


def thread_breakdown(raw: Path) -> str:
    """Per busy thread of a py-spy raw file (--threads: the thread is the first frame): the share of its
    samples in each activity."""
    threads: dict[str, Counter] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        threads[frames[0]][activity(frames[1:] or frames)] += int(count)
    rows = ["| thread | samples | activities (% of the thread's samples) |", "|---|---:|---|"]
    for name, c in threads.items():
        total = sum(c.values())
        if c["idle pool thread"] < 0.95 * total:
            rows.append(f"| {name} | {total} | "
                        + "; ".join(f"{k} {100 * v / total:.0f}" for k, v in c.most_common(5)) + " |")
    return "\n".join(rows)


def run_backend(backend: str, store: str, args, template: bytes) -> list[tuple]:
    import httpx

    from app.config import get_settings
    from app.db.session import session_scope
    from app.storage.blobs import BlobWriter, delete_blob_if_unreferenced

    work = Path(tempfile.mkdtemp(prefix=f"adaptd-upload-{backend}-{store}-"))
    blob_dir = work / "blobs" if store == "files" else "off"
    get_settings().blob_dir = blob_dir  # the "blob store alone" row, in this process
    stack, rows = Stack(backend, work, blob_dir=blob_dir), []
    try:
        url = stack.start()
        n = args.mib
        groups = {"API": lambda: stack.pids("api"), "client": lambda: [os.getpid()]}
        database = {"PostgreSQL": lambda: postgres_pids_of(stack.db_name)} if backend == "postgres" else {}
        groups |= database
        here = {"API": lambda: [os.getpid()], "client": lambda: []} | database
        with CpuSampler(here) as cpu:
            t = time.perf_counter()
            h = hashlib.sha256()
            for piece in body(template, n, "hash"):
                h.update(piece)
            rows.append(("sha256 alone (hashlib, one thread; CPU in the API column)", n, time.perf_counter() - t,
                         None, None))
        rows[-1] = rows[-1][:4] + (cpu.seconds(),)

        chunk = get_settings().chunk_bytes
        with CpuSampler(here) as cpu:
            t = time.perf_counter()
            w = BlobWriter(stack.db_url)
            for piece in body(template, n, f"direct-{time.time()}"):
                for i in range(0, len(piece), chunk):
                    w.write(piece[i:i + chunk])
            w.finish()
            wall = time.perf_counter() - t
        if args.delete:
            with session_scope(stack.db_url) as s:
                delete_blob_if_unreferenced(s, w.blob_id)
        writes = f"{chunk // 1024} KiB chunk inserts + commits" if store == "rows" else "file writes + fsync"
        rows.append((f"blob store alone, no HTTP ({writes} + sha256; CPU of this process in the API column)", n,
                     wall, None, cpu.seconds()))

        uploaded: list[str] = []

        def upload(mib: int, tag: str) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                r = c.post("/v1/uploads", params={"kind": "dataset", "filename": "big.bin"},
                           content=body(template, mib, tag), headers={"content-type": "application/octet-stream",
                                                                     "content-length": str(mib * MiB)})
                r.raise_for_status()
                uploaded.append(r.json()["id"])

        def measured() -> None:
            """With --delete: drop the uploads measured so far (outside the timed part)."""
            with httpx.Client(base_url=url, timeout=600) as c:
                while args.delete and uploaded:
                    c.delete(f"/v1/uploads/{uploaded.pop()}").raise_for_status()

        if args.profile:  # an extra 1-client upload, under py-spy
            spy = wall_profile(stack.pids("api")[-1], args.profile / f"upload-{backend}.txt")
            upload(n, f"profiled-{time.time()}")
            spy.wait(timeout=60)
            measured()
            print(f"\nWhere the API's threads spent one 1-client upload ({backend}; py-spy --idle, wall clock):\n")
            print(thread_breakdown(args.profile / f"upload-{backend}.txt"))
        for rep in range(args.repeat):
            with PeakRss(lambda: stack.pids("api")) as rss, CpuSampler(groups) as cpu:
                t = time.perf_counter()
                upload(n, f"x1-{rep}-{time.time()}")
                rows.append((f"HTTP, 1 client (run {rep + 1})", n, time.perf_counter() - t, rss, cpu.seconds()))
            measured()
            with PeakRss(lambda: stack.pids("api")) as rss, CpuSampler(groups) as cpu:
                t = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda k: upload(n // 4, f"x4-{rep}-{k}-{time.time()}"), range(4)))
                rows.append((f"HTTP, 4 clients (run {rep + 1})", n // 4 * 4, time.perf_counter() - t, rss,
                             cpu.seconds()))
            measured()
        return rows
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="postgres,sqlite")
    p.add_argument("--store", default="rows,files", help="rows: chunk rows in the database; files: ADAPTD_BLOB_DIR")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--delete", action="store_true", help="delete each upload once measured (steady-state memory)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--profile", type=Path, default=None, help="folder: py-spy the API's threads during one "
                   "extra 1-client upload and print where each spent its time")
    args = p.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if not (4 <= args.mib <= 4096 and 1 <= args.repeat <= 5):
        p.error("--mib 4..4096, --repeat 1..5")
    template = np.random.default_rng(0).integers(0, 256, MiB, dtype=np.uint8).tobytes()
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} CPUs ({cpu_model()}); load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    for backend, store in product(args.backend.split(","), args.store.split(",")):
        rows = run_backend(backend, store, args, template)
        print(f"\n### {backend}, {'chunk rows' if store == 'rows' else 'files (ADAPTD_BLOB_DIR)'}; load average "
              f"{os.getloadavg()[0]:.1f}\n")
        print("| what | MiB | s | MiB/s | MB/s | API peak RSS MiB | CPU s per GiB: API / database / client "
              "| MB/s if the API and the database each had a core |")
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        for name, mib, s, rss, cpu in rows:
            gib = mib / 1024
            db = cpu.get("PostgreSQL")
            cpu_s = (f"{cpu['API'] / gib:.1f} / {'—' if db is None else f'{db / gib:.1f}'} / "
                     f"{cpu['client'] / gib:.1f}")
            busiest = max(cpu["API"], db or 0.0)
            bound = f"{mib * MiB / 1e6 / busiest:.0f}" if busiest > 0 else ""
            print(f"| {name} | {mib} | {s:.2f} | {mib / s:.0f} | {mib * MiB / 1e6 / s:.0f} | "
                  f"{'' if rss is None else f'{rss.peak / MiB:.0f}'} | {cpu_s} | {bound} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
