"""Our segmentation TENT and CoTTA against the reference implementation, side by side on the CPU, in one process.

The reference is mariodoebler/test-time-adaptation, fetched by you outside this repository (nothing of it is in
this repository); --reference names its `segmentation` folder, and this script imports `methods/tent.py`,
`methods/cotta.py` (and their `methods/base.py`) from there at run time.

Same model (the segmentation benchmark's cached `unet_small`, benchmarks/segmentation_benchmark.py), same
canvases, same batches (--batch), same torch thread count, same hyper-parameters: the reference's
segmentation defaults (`segmentation/conf.py`, `cfgs/tent.yaml`, `cfgs/cotta.yaml`: SGD 2.5e-4, momentum 0.9, no
Nesterov, weight decay 5e-4; CoTTA: the head at 10x, EMA 0.999, restore 0.01, ap 0.9, 6 scales + flips; TENT
episodic), which are our catalogue's segmentation task defaults. Their model is ours wrapped so that its head is
named `seg_head` (their head/backbone split) and it accepts their `[x, interpolate]` call.

Protocol differences, kept as each side has them: the reference adapts each batch on two random crops
(--crop px, here 32 of the 48 px canvases so that every one of its 6 view sizes fits the UNet) and then predicts
the batch with the updated model (TENT reset after every batch, as its `EPISODIC: True`); ours predicts each
batch first (online) and then adapts on the whole batch, never resets, and its CoTTA teacher views are 0.25-0.875 of
the input. mIoU is over each side's stream of predictions (what the method returned per batch); img/s is target
images per second of wall-clock time (adapting + predicting).

    python benchmarks/segmentation_vs_reference.py --reference /work/scratch/seg-methods/tta/segmentation \\
        --data ../shared/data [--shifts "sensor noise,USPS"] [--batch 32] [--threads 2] [--n-target 300]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from app.contract.catalog import get_method_info, validate_params  # noqa: E402
from segmentation_benchmark import PRE, setup  # noqa: E402
from worker.adaptation import segmentation as S  # noqa: E402
from worker.adaptation.canvases import NUM_CLASSES  # noqa: E402
from worker.adaptation.data import Preprocess  # noqa: E402
from worker.adaptation.device import seed_everything  # noqa: E402
from worker.adaptation.methods import get_method  # noqa: E402
from worker.adaptation.methods.base import MethodContext  # noqa: E402


class TheirUNet(nn.Module):
    """Our UNet with its head registered as `seg_head` (the reference's split of backbone and head); takes
    their `[x, interpolate]` list as well as a tensor (a UNet's output is at the input's size either way)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.body = copy.deepcopy(unet)
        self.seg_head = self.body.head
        self.body.head = nn.Identity()

    def forward(self, x):
        if isinstance(x, (list, tuple)):
            x = x[0]
        return self.seg_head(self.body(x))


def reference_method(name: str, model: nn.Module, ref: Path, crop: int):
    sys.path.insert(0, str(ref))
    if not torch.cuda.is_available():  # their CoTTA moves its restore mask with .cuda()
        torch.Tensor.cuda = lambda self, *a, **k: self
    net = TheirUNet(model)
    sgd = dict(lr=2.5e-4, momentum=0.9, weight_decay=5e-4, nesterov=False)  # their conf.py / cfgs
    if name == "tent":
        from methods.tent import Tent
        net = Tent.configure_model(net)
        params, _ = Tent.collect_params(net)
        return Tent(net, torch.optim.SGD(params, **sgd), crop_size=(crop, crop), steps=1, episodic=True)
    from methods.cotta import CoTTA
    net.train()
    feat, head = CoTTA.collect_params(net)
    opt = torch.optim.SGD(feat, **sgd)
    opt.add_param_group({"params": head, "lr": 10 * sgd["lr"]})
    return CoTTA(net, opt, crop_size=(crop, crop), steps=1, episodic=False, n_augmentations=6, mt_alpha=0.999,
                 rst_m=0.01, ap=0.9)


def our_method(name: str, model: nn.Module, batch: int, n: int):
    info = get_method_info(name)
    ctx = MethodContext(num_classes=NUM_CLASSES, device=torch.device("cpu"), batch_size=batch, epochs=1,
                        dataset_size=n, input_mean=tuple(PRE["mean"]), input_std=tuple(PRE["std"]),
                        task="segmentation")
    method = get_method(name)(copy.deepcopy(model), validate_params(info, {}, "segmentation"), ctx)
    return lambda x: method.adapt(x, torch.arange(len(x))).logits


def stream(predict, batches, masks) -> tuple[float, float]:
    """(mIoU of the predictions returned batch by batch, images/s)."""
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    t0, start = time.perf_counter(), 0
    for x in batches:
        pred = predict(x).detach().argmax(1)
        cm += S.confusion(pred, torch.from_numpy(masks[start:start + len(x)]).long(), NUM_CLASSES)
        start += len(x)
    seconds = time.perf_counter() - t0
    return S.scores_from_confusion(cm)["miou"], start / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, required=True, help="the reference's `segmentation` folder")
    ap.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    ap.add_argument("--shifts", default="sensor noise,USPS,photo backgrounds")
    ap.add_argument("--methods", default="tent,cotta")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--crop", type=int, default=32, help="the reference's random crop (px)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-source", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=20, help="source training epochs (the cached UNet's)")
    ap.add_argument("--n-target", type=int, default=300)
    ap.add_argument("--width", type=int, default=16, help="UNet width (the cached model's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _, shifts = setup(args.data, args.n_source, args.n_target, args.epochs, args.width)
    prep = Preprocess(**PRE)
    rows = []
    for shift in args.shifts.split(","):
        x, y = shifts[shift]
        batches = [prep(torch.from_numpy(np.ascontiguousarray(x[i:i + args.batch])), torch.device("cpu"), False)
                   for i in range(0, len(x), args.batch)]
        source = copy.deepcopy(model).eval().requires_grad_(False)
        src_miou, _ = stream(source, batches, y)
        for name in args.methods.split(","):
            seed_everything(0)
            ours = stream(our_method(name, model, args.batch, len(x)), batches, y)
            seed_everything(0)
            theirs = stream(reference_method(name, model, args.reference, args.crop), batches, y)
            rows.append((shift, name, src_miou, *ours, *theirs))
            print(f"  {shift:18s} {name:6s} source {src_miou:.3f}  ours {ours[0]:.3f} ({ours[1]:.0f} img/s)  "
                  f"reference {theirs[0]:.3f} ({theirs[1]:.0f} img/s)", flush=True)
    print("\n| shift | method | source mIoU | ours mIoU | reference mIoU | ours img/s | reference img/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shift, name, src, o_miou, o_ips, r_miou, r_ips in rows:
        print(f"| {shift} | {name} | {100 * src:.1f} | {100 * o_miou:.1f} | {100 * r_miou:.1f} | {o_ips:.0f} | "
              f"{r_ips:.0f} |")


if __name__ == "__main__":
    main()
