"""What the file blob store's durability costs a small upload: a file written under tmp/, fsynced, renamed
into its folder and the folder fsynced (app/storage/files.py: ContentFile.seal), against the file fsync
alone and no fsync at all. Median and p90 latency per file.

    python benchmarks/small_file_sync.py [--folder /tmp] [--kib 96] [--files 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def one(folder: Path, i: int, data: bytes, sync_file: bool, sync_folder: bool) -> float:
    start = time.perf_counter()
    tmp, final = folder / "tmp" / f"f{i}", folder / "ab" / f"f{i}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.pwrite(fd, data, 0)
    if sync_file:
        os.fsync(fd)
    os.close(fd)
    os.replace(tmp, final)
    if sync_folder:
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp"))
    p.add_argument("--kib", type=int, default=96)
    p.add_argument("--files", type=int, default=50)
    args = p.parse_args(argv)
    data = os.urandom(args.kib * 1024)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.files} files of {args.kib} KiB")
    for label, sync_file, sync_folder in (("file + folder fsync (the store)", True, True),
                                          ("file fsync only", True, False), ("no fsync", False, False)):
        with tempfile.TemporaryDirectory(dir=args.folder) as d:
            folder = Path(d)
            (folder / "tmp").mkdir()
            (folder / "ab").mkdir()
            times = sorted(one(folder, i, data, sync_file, sync_folder) for i in range(args.files))
        median, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
        print(f"{label}: median {1000 * median:.1f} ms, p90 {1000 * p90:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
