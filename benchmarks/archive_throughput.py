"""Archive loading throughput: decoded images per second from a zip of JPEGs, and peak memory.

Generates N JPEGs of about 256 px (sizes vary from 240 to 272, so every image is resized to 224 on the
CPU in the loader, the path a real photo archive takes), then times one pass over the archive at
224 px with 0 and with 2 loader worker processes. Not part of the test run.

    .venv/bin/python benchmarks/archive_throughput.py [--images 2000] [--batch-size 128] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def natural_ish_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """Smooth random content plus sensor noise: compresses and decodes like a photo, unlike pure noise."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(240, 273, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def build_zip(path: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            zf.writestr(f"class_{i % 10}/img_{i:06d}.jpg", natural_ish_jpeg(rng))
    return path.stat().st_size


class MemorySampler:
    """Samples, every 100 ms, this process' RSS and the summed USS (unique pages) of its children: the
    loader workers' own memory, not the pages they share with this process after fork."""

    def __init__(self):
        import threading

        import psutil

        self.proc = psutil.Process()
        self.peak_main = self.peak_workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_main = max(self.peak_main, self.proc.memory_info().rss)
                workers = sum(c.memory_full_info().uss for c in self.proc.children(recursive=True))
                self.peak_workers = max(self.peak_workers, workers)
            except Exception:  # noqa: BLE001 - a worker exiting between listing and reading
                pass
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # internal: build the zip and exit
    args = ap.parse_args()
    if args.build_only:
        build_zip(args.build_only, args.images)
        return

    import subprocess

    import torch

    torch.set_num_threads(1)
    from worker.adaptation.data.archives import ArchiveImageSet

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.zip"
        t0 = time.perf_counter()
        # built in a child process, so this process' peak memory is the loader's alone
        subprocess.run([sys.executable, __file__, "--images", str(args.images), "--build-only", str(path)],
                       check=True)
        size = path.stat().st_size
        print(f"archive: {args.images} JPEGs, 240-272 px, {size / 2**20:.1f} MiB, built in "
              f"{time.perf_counter() - t0:.1f} s")
        import psutil

        print(f"RSS after imports: {psutil.Process().memory_info().rss / 2**20:.0f} MiB")
        print(f"{'workers':>7} | {'index s':>7} | {'decode images/s':>15} | {'epoch s':>7} | "
              f"{'peak main RSS MiB':>17} | {'peak workers USS MiB':>20}")
        for workers in args.workers:
            t0 = time.perf_counter()
            images = ArchiveImageSet(path, "zip", preprocess_size=args.size, num_workers=workers)
            t_index = time.perf_counter() - t0
            n = 0
            with MemorySampler() as mem:
                t0 = time.perf_counter()
                for xb, _ in images.batches(args.batch_size):
                    assert xb.shape[1:] == (args.size, args.size, 3)
                    n += xb.shape[0]
                t_epoch = time.perf_counter() - t0
            images.close()
            print(f"{workers:>7} | {t_index:>7.2f} | {n / t_epoch:>15.0f} | {t_epoch:>7.2f} | "
                  f"{mem.peak_main / 2**20:>17.0f} | {mem.peak_workers / 2**20:>20.0f}")
        decoded = args.images * args.size * args.size * 3 / 2**20
        print(f"(all {args.images} images decoded at {args.size} px would take {decoded:.0f} MiB; "
              f"a batch of {args.batch_size} takes {args.batch_size * args.size * args.size * 3 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
