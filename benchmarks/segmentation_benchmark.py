"""Segmentation benchmark on real digits (CPU): a small UNet trained on canvases of 1-3 MNIST digits with
per-pixel masks (11 classes: background + 10 digits), adapted to real shifts it never saw, every method
through the same runner a job uses. Prints mIoU before -> after per method and shift.

    python benchmarks/segmentation_benchmark.py --data ../shared/data [--epochs 6] [--n-source 2000]

Shifts: USPS digits (another scanner and writing population, 16 px upscaled), MNIST test digits blended on
real photographs bundled with scikit-image (MNIST-M's |photo - digit| recipe), and a sensor shift (low
contrast, bright background, Gaussian noise). `sfda_prior` gets one prior for every image: each class's mean
pixel proportion on the source canvases (what a user knows as "a typical digit covers this much")."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adaptation.canvases import (NUM_CLASSES, make_canvases, noise_contrast, photo_blend,  # noqa: E402
                                        skimage_photos, to_rgb)
from worker.adaptation.data import Preprocess  # noqa: E402
from worker.adaptation.device import seed_everything  # noqa: E402
from worker.adaptation.models import build_model  # noqa: E402
from worker.adaptation.models.export import save_safetensors  # noqa: E402
from worker.adaptation.runner import RunRequest, run  # noqa: E402
from worker.adaptation.training import train_segmenter  # noqa: E402

PRE = {"size": 48, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
MODEL = {"architecture": "unet_small", "num_classes": NUM_CLASSES}


def methods(prior: list[float]) -> list[tuple[str, dict, int]]:
    return [("source", {}, 1), ("bn_adapt", {}, 1), ("tent", {}, 1),
            ("sfda_prior", {"class_ratio_prior": prior, "lr": 1e-4}, 3)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=6, help="source training epochs")
    ap.add_argument("--n-source", type=int, default=2000)
    ap.add_argument("--n-target", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mnist = np.load(args.data / "mnist_train5k.npz")
    test = np.load(args.data / "mnist_test.npz")
    usps = np.load(args.data / "usps_test.npz")
    crop = (slice(None), slice(4, 24), slice(4, 24))  # MNIST's 20 px digit box
    src = make_canvases(mnist["x"][crop], mnist["y"], args.n_source, seed=0)
    same = make_canvases(test["x"][crop][:5000], test["y"][:5000], args.n_target, seed=1)
    usps_c = make_canvases(usps["x"], usps["y"], args.n_target, seed=2)
    shifts = {"MNIST test (no shift)": (to_rgb(same.x), same.masks),
              "USPS": (to_rgb(usps_c.x), usps_c.masks),
              "photo backgrounds": (photo_blend(same.x, skimage_photos(), seed=3), same.masks),
              "sensor noise": (noise_contrast(to_rgb(same.x), seed=4), same.masks)}
    t0 = time.perf_counter()
    seed_everything(0)
    model = train_segmenter(build_model("unet_small", NUM_CLASSES), to_rgb(src.x), src.masks, Preprocess(**PRE),
                            epochs=args.epochs, lr=3e-3)
    print(f"source UNet: {args.n_source} canvases, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s")
    prior = [float((src.masks == c).mean()) for c in range(NUM_CLASSES)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_safetensors(model, root / "model.safetensors")
        for shift, (x, y) in shifts.items():
            path = root / "target.npz"
            np.savez(path, x=x, y=y)
            for method, params, epochs in methods(prior):
                t = time.perf_counter()
                m = run(RunRequest.for_files(root / "model.safetensors", path, root / method, eval_path=path,
                                             task="segmentation", method=method, params=params, model=MODEL,
                                             preprocess=PRE, options={"batch_size": 32, "epochs": epochs})).metrics
                rows.append((shift, method, m["miou_before"], m["miou_after"], m["dice_after"],
                             m["collapse_detected"], time.perf_counter() - t))
                print(f"  {shift:22s} {method:10s} mIoU {m['miou_before']:.3f} -> {m['miou_after']:.3f}", flush=True)
    print("\n| shift | method | mIoU before | mIoU after | Dice after | collapse | seconds |")
    print("|---|---|---:|---:|---:|---|---:|")
    for shift, method, before, after, dice, collapsed, secs in rows:
        print(f"| {shift} | {method} | {100 * before:.1f} | {100 * after:.1f} | {100 * dice:.1f} | "
              f"{'yes' if collapsed else 'no'} | {secs:.1f} |")


if __name__ == "__main__":
    main()
