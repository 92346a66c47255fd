"""Archive loading throughput: decoded images per second from a container of JPEGs, and peak memory.

Generates N JPEGs of about 256 px (sizes vary from 240 to 272, so every image is resized to 224 on the
CPU in the loader, the path a real photo archive takes), packs the same bytes as a zip, a WebDataset
tar shard (`.jpg` + `.cls`), a Hugging Face parquet file and a zipped save_to_disk folder, then times
indexing and one pass over each at 224 px with 0 and with 2 loader worker processes. Not part of the
test run.

    .venv/bin/python benchmarks/archive_throughput.py [--images 2000] [--batch-size 128] [--workers 0 2]
        [--formats zip webdataset parquet hf_dataset]
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
SUFFIX = {"zip": "zip", "webdataset": "tar", "parquet": "parquet", "hf_dataset": "hf.zip"}  # format -> file


def natural_ish_jpeg(rng: np.random.Generator, quality: int = 90) -> bytes:
    """Smooth random content plus sensor noise: compresses and decodes like a photo, unlike pure noise."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(240, 273, size=2))
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def build(path: Path, fmt: str, n: int, seed: int = 0) -> None:
    from tests import builders as B

    rng = np.random.default_rng(seed)
    images = [natural_ish_jpeg(rng) for _ in range(n)]
    labels = [i % 10 for i in range(n)]
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for i, data in enumerate(images):
                zf.writestr(f"class_{labels[i]}/img_{i:06d}.jpg", data)
    elif fmt == "webdataset":
        B.build_tar(path, B.webdataset_files(images, labels, ext="jpg"))
    else:
        table = B.hf_table(images, labels, [str(c) for c in range(10)])
        if fmt == "parquet":
            B.hf_parquet(path, table)
        else:
            B.hf_saved_dataset_zip(path, table)


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
    ap.add_argument("--formats", nargs="+", default=list(SUFFIX), choices=list(SUFFIX))
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # internal: build one file and exit
    args = ap.parse_args()
    if args.build_only:
        build(args.build_only, args.formats[0], args.images)
        return

    import subprocess

    import torch

    torch.set_num_threads(1)
    from worker.adaptation.data import open_image_set

    with tempfile.TemporaryDirectory() as tmp:
        import psutil

        print(f"{args.images} JPEGs, 240-272 px; RSS after imports: "
              f"{psutil.Process().memory_info().rss / 2**20:.0f} MiB")
        print(f"{'format':>10} | {'MiB':>5} | {'workers':>7} | {'index s':>7} | {'decode images/s':>15} | "
              f"{'epoch s':>7} | {'peak main RSS MiB':>17} | {'peak workers USS MiB':>20}")
        for fmt, workers in [(f, w) for f in args.formats for w in args.workers]:
            path = Path(tmp) / f"images.{SUFFIX[fmt]}"
            if not path.exists():  # built in a child process: this process' peak memory is the loader's alone
                subprocess.run([sys.executable, __file__, "--images", str(args.images), "--formats", fmt,
                                "--build-only", str(path)], check=True)
            n = 0
            with MemorySampler() as mem:  # indexing included: tables are copied to a spill file then
                t0 = time.perf_counter()
                images = open_image_set(path, preprocess_size=args.size, num_workers=workers)
                t_index = time.perf_counter() - t0
                t0 = time.perf_counter()
                for xb, _ in images.batches(args.batch_size):
                    assert xb.shape[1:] == (args.size, args.size, 3)
                    n += xb.shape[0]
                t_epoch = time.perf_counter() - t0
            images.close()
            print(f"{fmt:>10} | {path.stat().st_size / 2**20:>5.1f} | {workers:>7} | {t_index:>7.2f} | "
                  f"{n / t_epoch:>15.0f} | {t_epoch:>7.2f} | "
                  f"{mem.peak_main / 2**20:>17.0f} | {mem.peak_workers / 2**20:>20.0f}")
        decoded = args.images * args.size * args.size * 3 / 2**20
        print(f"(all {args.images} images decoded at {args.size} px would take {decoded:.0f} MiB; "
              f"a batch of {args.batch_size} takes {args.batch_size * args.size * args.size * 3 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
