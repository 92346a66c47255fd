"""Segmentation benchmark on real digits (CPU): a small UNet trained on canvases of 1-3 MNIST digits with
per-pixel masks (11 classes: background + 10 digits), adapted to real shifts it never saw, every method
through the same runner a job uses. Prints mIoU before -> after per job, then (with several source seeds or
idm shots) the mean per method and shift, the worst and best job's gain, and how many jobs gained.

    python benchmarks/segmentation_benchmark.py --data ../shared/data [--epochs 6] [--n-source 2000] \
        [--source-seeds 0,1,2,3,4] [--idm-shots 0,1,2,3,4]

A source model's figures move by several points from one training seed to the next (and from one CPU type to
another: its kernels round differently), and a one-shot method's with its one image: a single run can show a
+/-2 point gain with either sign. The benchmark's table is the mean over seeds and shots.

Shifts: USPS digits (another scanner and writing population, 16 px upscaled), MNIST test digits blended on
real photographs bundled with scikit-image (MNIST-M's |photo - digit| recipe), the same digits drawn over
those photographs dimmed to half their brightness, and a sensor shift (low contrast, bright background,
Gaussian noise). `sfda_prior` gets one prior for every image: each class's mean
pixel proportion on the source canvases, every digit equally likely ("one prior"), or, as the authors do, each
class's typical size times the image's tags (which digits it holds: image-level labels a user gives)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

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


class Job(NamedTuple):
    seed: int  # the source model's training seed
    shift: str
    method: str
    shot: str | None  # idm's one target canvas
    before: float  # mIoU
    after: float
    dice: float  # after
    collapsed: bool
    seconds: float


def tag_priors(masks: np.ndarray, sizes: np.ndarray) -> list[list[float]]:
    """Bateson's per-image prior: one typical proportion per class times the image's tags (which digits it
    holds: image-level labels a user can give), background taking the rest."""
    tags = np.stack([(masks == c).any(axis=(1, 2)) for c in range(NUM_CLASSES)], 1).astype(np.float64)
    prior = tags * sizes[None]
    prior[:, 0] = np.clip(1.0 - prior[:, 1:].sum(1), 0.05, 1.0)
    return prior.tolist()


def methods(sizes: np.ndarray, masks: np.ndarray, idm_steps: int,
            idm_params: dict) -> list[tuple[str, str, dict, int | None]]:
    mean = [float(sizes[0])] + [float(v) / 10 for v in sizes[1:]]  # every digit equally likely, no tags
    return [("source", "source", {}, 1), ("bn_adapt", "bn_adapt", {}, 1), ("tent", "tent", {}, 1),
            ("sfda_prior (one prior)", "sfda_prior", {"class_ratio_prior": mean, "lr": 1e-4}, 3),
            ("sfda_prior (tags)", "sfda_prior", {"class_ratio_prior": tag_priors(masks, sizes), "lr": 1e-4}, 3),
            ("cotta", "cotta", {}, 1),
            # one-shot: one target canvas + the labelled source canvases
            ("idm (1 target image + source pool)", "idm", idm_params, idm_steps)]


def setup(data: Path, n_source: int, n_target: int, epochs: int, width: int = 16, augment: bool = False,
          seed: int = 0):
    """(source UNet, source canvases, {shift: (target images, masks)}); the UNet cached in benchmarks/.cache.
    `seed`: the source model's training seed (initialisation and batch order; the canvases stay the same).
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
    tag = ("" if width == 16 else f"_w{width}") + ("_aug" if augment else "") + (f"_seed{seed}" if seed else "")
    cache = Path(__file__).resolve().parent / ".cache" / f"unet_mnist_{n_source}_{epochs}{tag}.safetensors"
    t0 = time.perf_counter()
    if cache.exists():
        model, _ = load_model("unet_small", NUM_CLASSES, {"width": width}, cache)
    else:
        seed_everything(seed)
        model = train_segmenter(build_model("unet_small", NUM_CLASSES, width=width), to_rgb(src.x), src.masks,
                                Preprocess(**PRE), epochs=epochs, lr=3e-3, seed=seed, photometric=augment)
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
    print(f"source UNet (width {width}{', photometric augmentation' if augment else ''}, seed {seed}): "
          f"{n_source} canvases, {epochs} epochs, {time.perf_counter() - t0:.0f} s")
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
    ap.add_argument("--idm-shots", default="0", help="comma-separated target canvases, each idm's one shot in a "
                    "job of its own (every job is scored on all canvases)")
    ap.add_argument("--idm-steps", type=int, default=100, help="idm's steps (its `epochs`)")
    ap.add_argument("--idm-params", default="{}", help="idm's params, JSON (default: the catalogue's)")
    ap.add_argument("--source-seeds", default="0", help="comma-separated training seeds of the source model: "
                    "each is trained (and cached) and every method runs on each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for seed in args.source_seeds.split(",") for row in run_seed(args, int(seed))]
    print("\n| seed | shift | method | shot | mIoU before | mIoU after | Dice after | collapse | seconds |")
    print("|---:|---|---|---:|---:|---:|---:|---|---:|")
    for j in rows:
        print(f"| {j.seed} | {j.shift} | {j.method} | {'' if j.shot is None else j.shot} | {100 * j.before:.1f} | "
              f"{100 * j.after:.1f} | {100 * j.dice:.1f} | {'yes' if j.collapsed else 'no'} | {j.seconds:.1f} |")
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in rows:
        groups.setdefault((j.shift, j.method), []).append(j)
    if max(map(len, groups.values())) > 1:
        print("\nmeans over the jobs of each row (source seeds, and idm's shots); gain = after - before per job")
        print("\n| shift | method | jobs | mIoU before | mIoU after | worst gain | best gain | jobs that gain | "
              "collapses |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for (shift, method), mine in groups.items():
            gains = [100 * (j.after - j.before) for j in mine]
            print(f"| {shift} | {method} | {len(mine)} | {100 * np.mean([j.before for j in mine]):.1f} | "
                  f"{100 * np.mean([j.after for j in mine]):.1f} | {min(gains):+.1f} | {max(gains):+.1f} | "
                  f"{sum(g > 0 for g in gains)} | {sum(j.collapsed for j in mine)} |")


def run_seed(args: argparse.Namespace, seed: int) -> list[Job]:
    """Every method on every shift for the source model trained with `seed`: one row per job."""
    model, src, shifts = setup(args.data, args.n_source, args.n_target, args.epochs, args.width,
                               args.source_augment == "photometric", seed)
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
            for label, method, params, epochs in methods(sizes, y, args.idm_steps, json.loads(args.idm_params)):
                if args.only and method not in args.only.split(","):
                    continue
                for shot in (args.idm_shots.split(",") if method == "idm" else [None]):
                    data = path
                    if shot is not None:  # idm's one-shot target image
                        data = root / "one.npz"
                        np.savez(data, x=x[int(shot):int(shot) + 1])
                    t = time.perf_counter()
                    m = run(RunRequest.for_files(root / "model.safetensors", data, root / method, eval_path=path,
                                                 source_path=root / "source.npz" if shot is not None else None,
                                                 task="segmentation", method=method, params=params,
                                                 model=spec_model, preprocess=PRE,
                                                 options={"batch_size": 32, "epochs": epochs})).metrics
                    rows.append(Job(seed, shift, label, shot, m["miou_before"], m["miou_after"], m["dice_after"],
                                    m["collapse_detected"], time.perf_counter() - t))
                    print(f"  seed {seed} {shift:22s} {label:24s}{'' if shot is None else f' shot {shot}'} mIoU "
                          f"{m['miou_before']:.3f} -> {m['miou_after']:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
