"""Segmentation benchmark on real digits (CPU): a small UNet trained on canvases of 1-3 MNIST digits with
per-pixel masks (11 classes: background + 10 digits), adapted to real shifts it never saw, every method
through the same runner a job uses. Prints mIoU before -> after per method and shift.

    python benchmarks/segmentation_benchmark.py --data ../shared/data [--epochs 6] [--n-source 2000]

Shifts: USPS digits (another scanner and writing population, 16 px upscaled), MNIST test digits blended on
real photographs bundled with scikit-image (MNIST-M's |photo - digit| recipe), the same digits drawn over
those photographs dimmed to half their brightness, and a sensor shift (low contrast, bright background,
Gaussian noise). `sfda_prior` gets one prior for every image: each class's mean
pixel proportion on the source canvases, every digit equally likely ("one prior"), or, as the authors do, each
class's typical size times the image's tags (which digits it holds: image-level labels a user gives)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adaptation.source_augment import photometric  # noqa: E402
from worker.adaptation.canvases import (NUM_CLASSES, make_canvases, noise_contrast, photo_blend, photo_overlay,  # noqa: E402
                                        skimage_photos, to_rgb)
from worker.adaptation.data import Preprocess  # noqa: E402
from worker.adaptation.device import seed_everything  # noqa: E402
from worker.adaptation.models import build_model  # noqa: E402
from worker.adaptation.models.export import recalibrate_batch_norm, save_safetensors  # noqa: E402
from worker.adaptation.models.loading import load_model  # noqa: E402
from worker.adaptation.runner import RunRequest, run  # noqa: E402
from worker.adaptation.training import train_segmenter  # noqa: E402

PRE = {"size": 48, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
MODEL = {"architecture": "unet_small", "num_classes": NUM_CLASSES}


def tag_priors(masks: np.ndarray, sizes: np.ndarray) -> list[list[float]]:
    """Bateson's per-image prior: one typical proportion per class times the image's tags (which digits it
    holds: image-level labels a user can give), background taking the rest."""
    tags = np.stack([(masks == c).any(axis=(1, 2)) for c in range(NUM_CLASSES)], 1).astype(np.float64)
    prior = tags * sizes[None]
    prior[:, 0] = np.clip(1.0 - prior[:, 1:].sum(1), 0.05, 1.0)
    return prior.tolist()


def methods(sizes: np.ndarray, masks: np.ndarray) -> list[tuple[str, str, dict, int | None]]:
    mean = [float(sizes[0])] + [float(v) / 10 for v in sizes[1:]]  # every digit equally likely, no tags
    return [("source", "source", {}, 1), ("bn_adapt", "bn_adapt", {}, 1), ("tent", "tent", {}, 1),
            ("sfda_prior (one prior)", "sfda_prior", {"class_ratio_prior": mean, "lr": 1e-4}, 3),
            ("sfda_prior (tags)", "sfda_prior", {"class_ratio_prior": tag_priors(masks, sizes), "lr": 1e-4}, 3),
            ("cotta", "cotta", {}, 1),
            # one-shot: the first target canvas + the labelled source canvases, 100 steps (default 300)
            ("idm (1 target image + source pool)", "idm", {}, 100)]


def setup(data: Path, n_source: int, n_target: int, epochs: int, width: int = 16, augment: bool = False):
    """(source UNet, source canvases, {shift: (target images, masks)}); the UNet cached in benchmarks/.cache.
    `augment`: the source model trained with generic photometric augmentation (worker/adaptation/
    source_augment.py: inversion, colour jitter, blur, noise; nothing from the target shifts). Shared with
    benchmarks/segmentation_vs_reference.py."""
    mnist = np.load(data / "mnist_train5k.npz")
    test = np.load(data / "mnist_test.npz")
    usps = np.load(data / "usps_test.npz")
    crop = (slice(None), slice(4, 24), slice(4, 24))  # MNIST's 20 px digit box
    src = make_canvases(mnist["x"][crop], mnist["y"], n_source, seed=0)
    same = make_canvases(test["x"][crop][:5000], test["y"][:5000], n_target, seed=1)
    usps_c = make_canvases(usps["x"], usps["y"], n_target, seed=2)
    shifts = {"MNIST test (no shift)": (to_rgb(same.x), same.masks),
              "USPS": (to_rgb(usps_c.x), usps_c.masks),
              "photo backgrounds": (photo_blend(same.x, skimage_photos(), seed=3), same.masks),
              "digits over dimmed photos": (photo_overlay(same.x, skimage_photos(), dim=0.5, seed=3), same.masks),
              "sensor noise": (noise_contrast(to_rgb(same.x), seed=4), same.masks)}
    tag = ("" if width == 16 else f"_w{width}") + ("_aug" if augment else "")
    cache = Path(__file__).resolve().parent / ".cache" / f"unet_mnist_{n_source}_{epochs}{tag}.safetensors"
    t0 = time.perf_counter()
    if cache.exists():
        model, _ = load_model("unet_small", NUM_CLASSES, {"width": width}, cache)
    else:
        seed_everything(0)
        model = train_segmenter(build_model("unet_small", NUM_CLASSES, width=width), to_rgb(src.x), src.masks,
                                Preprocess(**PRE), epochs=epochs, lr=3e-3, photometric=augment)
        cache.parent.mkdir(exist_ok=True)
        save_safetensors(model, cache)
    # Adam at a constant lr leaves BatchNorm's running statistics an EMA over the last ~10 batches of moving
    # weights; they change from one training run to the next (in-domain mIoU 77.5 on one, 87.6 on another).
    # The source model is published as its trainer would: statistics of its final weights over its training set
    # (augmented as in training when it was).
    rng = np.random.default_rng(0)
    batches = (torch.from_numpy(to_rgb(src.x[i:i + 100])) for i in range(0, len(src.x), 100))
    recalibrate_batch_norm(model, (Preprocess(**PRE)(photometric(b, rng) if augment else b, torch.device("cpu"))
                                   for b in batches))
    print(f"source UNet (width {width}{', photometric augmentation' if augment else ''}): {n_source} canvases, "
          f"{epochs} epochs, {time.perf_counter() - t0:.0f} s")
    return model, src, shifts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--epochs", type=int, default=6, help="source training epochs")
    ap.add_argument("--n-source", type=int, default=2000)
    ap.add_argument("--n-target", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--width", type=int, default=16, help="UNet width (16: 0.12 M parameters; 8: 4x cheaper)")
    ap.add_argument("--shifts", default="", help="comma-separated shift names, in this order (default: all)")
    ap.add_argument("--source-augment", choices=("photometric", "none"), default="none",
                    help="the source model's training augmentation (photometric: generic, source_augment.py; "
                    "BENCHMARKS.md has that experiment)")
    ap.add_argument("--idm-shot", type=int, default=0, help="which target canvas idm gets as its one shot "
                    "(it is scored on all of them)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, src, shifts = setup(args.data, args.n_source, args.n_target, args.epochs, args.width,
                               args.source_augment == "photometric")
    spec_model = {**MODEL, "arch_kwargs": {"width": args.width}}
    # a digit's typical share of a canvas where it occurs; the background's mean share
    sizes = np.array([(src.masks == c).sum((1, 2))[(src.masks == c).any((1, 2))].mean() / src.masks[0].size
                      for c in range(NUM_CLASSES)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_safetensors(model, root / "model.safetensors")
        np.savez(root / "source.npz", x=to_rgb(src.x), y=src.masks)  # idm's labelled source pool
        for shift in (args.shifts.split(",") if args.shifts else shifts):
            x, y = shifts[shift]
            path = root / "target.npz"
            np.savez(path, x=x, y=y)
            np.savez(root / "one.npz", x=x[args.idm_shot:args.idm_shot + 1])  # idm's one-shot target image
            for label, method, params, epochs in methods(sizes, y):
                if args.only and method not in args.only.split(","):
                    continue
                one_shot = method == "idm"
                t = time.perf_counter()
                m = run(RunRequest.for_files(root / "model.safetensors", root / "one.npz" if one_shot else path,
                                             root / method, eval_path=path,
                                             source_path=root / "source.npz" if one_shot else None,
                                             task="segmentation", method=method, params=params, model=spec_model,
                                             preprocess=PRE, options={"batch_size": 32, "epochs": epochs})).metrics
                rows.append((shift, label, m["miou_before"], m["miou_after"], m["dice_after"],
                             m["collapse_detected"], time.perf_counter() - t))
                print(f"  {shift:22s} {label:24s} mIoU {m['miou_before']:.3f} -> {m['miou_after']:.3f}", flush=True)
    print("\n| shift | method | mIoU before | mIoU after | Dice after | collapse | seconds |")
    print("|---|---|---:|---:|---:|---|---:|")
    for shift, method, before, after, dice, collapsed, secs in rows:
        print(f"| {shift} | {method} | {100 * before:.1f} | {100 * after:.1f} | {100 * dice:.1f} | "
              f"{'yes' if collapsed else 'no'} | {secs:.1f} |")


if __name__ == "__main__":
    main()
