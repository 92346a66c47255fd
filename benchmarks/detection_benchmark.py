"""Detection benchmark on real digits (CPU): `fcos_small` (torchvision's FCOS on a small CNN + FPN) trained on
canvases of 1-3 MNIST digits with their boxes (label = 1 + digit), adapted to real shifts it never saw, every
method through the same runner a job uses. Prints COCO mAP and mAP50 before -> after per method and shift.

    python benchmarks/detection_benchmark.py --data ../shared/data [--epochs 15] [--n-source 1000]

Shifts: USPS digits (another scanner and writing population, 16 px upscaled), MNIST test digits blended on
real photographs bundled with scikit-image (MNIST-M's |photo - digit| recipe), and a sensor shift (lower
contrast, brighter background, Gaussian noise). The source detector is cached in benchmarks/.cache.

Settings that differ from the authors' (a small FCOS on a few hundred images, not Faster R-CNN on
Cityscapes): pseudo-label score threshold 0.5 (FCOS's scores are √(class · centerness) and stay under 0.8
here), EMA keep 0.99 (0.9996 over ~40 steps leaves the teacher where it started), no flip (digits)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adaptation.canvases import make_canvases, noise_contrast, photo_blend, skimage_photos, to_rgb  # noqa: E402
from worker.adaptation.device import seed_everything  # noqa: E402
from worker.adaptation.models import build_model  # noqa: E402
from worker.adaptation.models.export import save_safetensors  # noqa: E402
from worker.adaptation.models.loading import load_model  # noqa: E402
from worker.adaptation.runner import RunRequest, run  # noqa: E402
from worker.adaptation.training import train_detector  # noqa: E402

NUM_CLASSES = 11  # label 0 unused (no background class in FCOS), digits 1..10
ARCH_KWARGS = {"min_size": 48, "max_size": 48}
MODEL = {"architecture": "fcos_small", "num_classes": NUM_CLASSES, "arch_kwargs": ARCH_KWARGS}
SHORT = {"score_threshold": 0.5, "ema_keep": 0.99, "flip": False}


def methods(epochs: int) -> list[tuple[str, str, dict, int]]:
    return [("source", "source", {}, 1), ("bn_adapt", "bn_adapt", {}, 1),
            ("mean_teacher", "mean_teacher", SHORT, epochs),
            ("mean_teacher + BN", "mean_teacher", {**SHORT, "adapt_batch_norm": True}, epochs),
            ("titan", "titan", SHORT, epochs),
            ("titan + BN", "titan", {**SHORT, "adapt_batch_norm": True}, epochs),
            ("fixed_pseudo_labels (BN)", "fixed_pseudo_labels", {"score_threshold": 0.5, "flip": False}, epochs)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=15, help="source training epochs")
    ap.add_argument("--n-source", type=int, default=1000)
    ap.add_argument("--n-target", type=int, default=160)
    ap.add_argument("--adapt-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="shift names to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mnist = np.load(args.data / "mnist_train5k.npz")
    test = np.load(args.data / "mnist_test.npz")
    usps = np.load(args.data / "usps_test.npz")
    crop = (slice(None), slice(4, 24), slice(4, 24))  # MNIST's 20 px digit box
    src = make_canvases(mnist["x"][crop], mnist["y"], args.n_source, seed=0)
    same = make_canvases(test["x"][crop][:5000], test["y"][:5000], args.n_target, seed=1)
    usps_c = make_canvases(usps["x"], usps["y"], args.n_target, seed=2)
    shifts = {"MNIST test (no shift)": (to_rgb(same.x), same),
              "USPS": (to_rgb(usps_c.x), usps_c),
              "photo backgrounds": (photo_blend(same.x, skimage_photos(), seed=3), same),
              "sensor noise": (noise_contrast(to_rgb(same.x), seed=4), same)}
    if args.only:
        shifts = {k: v for k, v in shifts.items() if k in args.only}
    cache = Path(__file__).resolve().parent / ".cache" / f"fcos_small_mnist_{args.n_source}_{args.epochs}.safetensors"
    t0 = time.perf_counter()
    if cache.exists():
        model, _ = load_model("fcos_small", NUM_CLASSES, ARCH_KWARGS, cache)
    else:
        seed_everything(0)
        model = train_detector(build_model("fcos_small", NUM_CLASSES, **ARCH_KWARGS), to_rgb(src.x), src.boxes,
                               src.labels + 1, src.image_index, epochs=args.epochs, lr=3e-3)
        cache.parent.mkdir(exist_ok=True)
        save_safetensors(model, cache)
    print(f"source fcos_small: {args.n_source} canvases, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_safetensors(model, root / "model.safetensors")
        for shift, (x, c) in shifts.items():
            path = root / "target.npz"
            np.savez(path, x=x, boxes=c.boxes, labels=c.labels + 1, image_index=c.image_index)
            for label, method, params, epochs in methods(args.adapt_epochs):
                t = time.perf_counter()
                m = run(RunRequest.for_files(root / "model.safetensors", path, root / method, eval_path=path,
                                             task="detection", method=method, params=params, model=MODEL,
                                             options={"batch_size": 16, "epochs": epochs})).metrics
                rows.append((shift, label, m, time.perf_counter() - t))
                print(f"  {shift:22s} {label:26s} mAP {m['map_before']:.3f} -> {m['map_after']:.3f}  "
                      f"mAP50 {m['map50_before']:.3f} -> {m['map50_after']:.3f}  "
                      f"det/img {m['detections_per_image_after']:.2f}  collapse {m['collapse_detected']}", flush=True)
    print("\n| shift | method | mAP before | mAP after | mAP50 before | mAP50 after | det/img after | collapse | s |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|")
    for shift, method, m, secs in rows:
        print(f"| {shift} | {method} | {100 * m['map_before']:.1f} | {100 * m['map_after']:.1f} | "
              f"{100 * m['map50_before']:.1f} | {100 * m['map50_after']:.1f} | {m['detections_per_image_after']:.2f} | "
              f"{'yes' if m['collapse_detected'] else 'no'} | {secs:.0f} |")


if __name__ == "__main__":
    main()
