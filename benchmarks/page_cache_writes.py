"""What the kernel charges a process for writing a file into the page cache, per GiB: into memory the
machine has not used since it booted, and into memory freed a moment ago (the same files written again
after deleting the first ones). On a VM whose host backs guest memory on first touch, the first costs
several times the second; a server whose memory already serves as page cache sees the second. The file
blob store (app/storage/files.py) pays this in the API's process, where PostgreSQL paid it for chunk rows.

    python benchmarks/page_cache_writes.py [--folder /tmp] [--files 8] [--mib 256]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

MiB = 1 << 20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_files(folder: Path, tag: str, files: int, mib: int, block: bytes) -> list[float]:
    """CPU s/GiB of each file written (1 MiB pwrites, no fsync)."""
    out = []
    for k in range(files):
        before = cpu_seconds()
        fd = os.open(folder / f"page-cache-{tag}-{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(mib):
                os.pwrite(fd, block, i * MiB)
        finally:
            os.close(fd)
        out.append((cpu_seconds() - before) / (mib / 1024))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp"))
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args(argv)
    block = os.urandom(MiB)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MiB
    print(f"load average {os.getloadavg()[0]:.1f}; free memory {free} MiB; {args.files} files of {args.mib} MiB")
    for tag, label in (("a", "new pages (first write)"), ("b", "reused pages (after deleting the first files)")):
        costs = write_files(args.folder, tag, args.files, args.mib, block)
        print(f"{label}: CPU s/GiB per file " + " ".join(f"{c:.2f}" for c in costs))
        if tag == "a":
            for k in range(args.files):
                (args.folder / f"page-cache-a-{k}").unlink()
    for k in range(args.files):
        (args.folder / f"page-cache-b-{k}").unlink()
    print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
