"""Adaptation throughput per method on random inputs, against the reference figures (BENCHMARKS.md).

Drives each method through its `Method` class (one `step` per batch, as the runner does, without data
loading, the collapse guard or metrics) on WRN-28-10 (batch 200, 32 px, 10 classes) and ResNet-50
(batch 64, 224 px, 1000 classes), in fp32 (contiguous) and bf16 autocast + channels_last; a few warm-up
batches (cuDNN autotuning, lazy optimizer state), then timed batches between `cuda.synchronize()` calls.
Prints a markdown table: images/s, ms per batch, peak memory, the reference implementation's images/s
(mariodoebler/test-time-adaptation, fp32, one H200) and our ratio to it.

    python benchmarks/gpu_throughput.py                       # everything: ~2-4 min on an H200 (capped by --budget-s)
    python benchmarks/gpu_throughput.py --models wrn28_10 --methods tent,cotta --batches 10
    python benchmarks/gpu_throughput.py --quick --device cpu  # tiny sizes: a smoke test (< 1 minute)

Notes: inputs are a pool of 4 random batches already on the device (pixels uniform in [0, 1], normalised
with mean 0.5 / std 0.25, the normalisation passed to the methods for their augmentations). Models are
randomly initialised: their predictions are low-confidence, so CoTTA always takes its 32-view branch
(the CIFAR setting; see the `aug` note) and EATA/SAR's entropy filters keep few samples — which does
not change their cost here, since the filters are masks and every step runs its full backward pass.
Method params are the catalogue defaults (the authors' CIFAR settings) for both models. SFDA methods
(shot, nrc, aad) are timed per step, after their start-of-epoch pass over the pool (untimed).
`--budget-s` stops starting new measurements once exceeded (the rest print as skipped).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.contract.catalog import get_method_info, validate_params  # noqa: E402
from worker.adaptation.compiling import Compiling  # noqa: E402
from worker.adaptation.methods import get_method  # noqa: E402
from worker.adaptation.methods.base import MethodContext  # noqa: E402
from worker.adaptation.methods.registry import METHODS  # noqa: E402
from worker.adaptation.models import build_model, classifier_of  # noqa: E402

DEFAULT_METHODS = {
    "classification": ["source", "bn_adapt", "tent", "eata", "sar", "cotta", "rmt", "roid", "shot", "nrc", "aad"],
    "segmentation": ["source", "bn_adapt", "tent", "cotta", "sfda_prior"],
}
MEAN, STD = (0.5,), (0.25,)

# name -> (architecture, kwargs, batch size, image size, classes, task)
MODELS = {
    "wrn28_10": ("wrn28_10", {}, 200, 32, 10, "classification"),
    "resnet50": ("resnet50", {}, 64, 224, 1000, "classification"),
    # torchvision's segmenters (19 Cityscapes classes), 512×512 crops
    "lraspp": ("lraspp_mobilenet_v3_large", {}, 16, 512, 19, "segmentation"),
    "deeplabv3_mnv3": ("deeplabv3_mobilenet_v3_large", {}, 16, 512, 19, "segmentation"),
    "deeplabv3_r50": ("deeplabv3_resnet50", {}, 8, 512, 19, "segmentation"),
}
QUICK_MODELS = {  # same block types and code paths, CPU-sized: WRN-10-1 and a one-block-per-stage
    "wrn28_10": ("quick_wrn", {}, 4, 16, 10, "classification"),  # bottleneck ResNet
    "resnet50": ("quick_resnet", {}, 4, 32, 1000, "classification"),
    "lraspp": ("unet_small", {}, 4, 32, 19, "segmentation"),
    "deeplabv3_mnv3": ("unet_small", {}, 4, 32, 19, "segmentation"),
    "deeplabv3_r50": ("unet_small", {}, 4, 32, 19, "segmentation"),
}
# Params a method needs beyond its defaults for these random-input runs: a uniform class-ratio prior.
EXTRA_PARAMS = {("sfda_prior", "segmentation"): lambda classes: {"class_ratio_prior": [1.0 / classes] * classes}}


def build(arch: str, classes: int, **kwargs) -> torch.nn.Module:
    if arch == "quick_wrn":
        from worker.adaptation.models.wide_resnet import WideResNet
        return WideResNet(depth=10, widen_factor=1, num_classes=classes)
    if arch == "quick_resnet":
        from worker.adaptation.models.resnet import Bottleneck, ResNet
        return ResNet(Bottleneck, [1, 1, 1, 1], classes)
    return build_model(arch, classes, **kwargs)

# Reference implementations (mariodoebler/test-time-adaptation), fp32, one H200, images/s.
REFERENCE = {
    "wrn28_10": {"source": 16200, "bn_adapt": 15500, "tent": 6800, "eata": 6400, "sar": 3300, "rmt": 1700,
                 "cotta": 260, "roid": 120},
    "resnet50": {"tent": 2460, "eata": 2270, "sar": 1150, "cotta": 33, "roid": 16},
}
# Reference: a plain TENT step in bf16 + channels_last (no torch.compile).
REFERENCE_TENT_BF16 = {"wrn28_10": 14300, "resnet50": 4300}

# name -> (autocast precision, channels_last, torch.compile of the adapted model)
PRECISIONS = {"fp32": ("fp32", False, False), "fp32-cl": ("fp32", True, False), "bf16-cl": ("bf16", True, False),
              "bf16-cl-compile": ("bf16", True, True)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="wrn28_10,resnet50")
    ap.add_argument("--methods", default=None,
                    help="comma-separated (default: every method the model's task has in DEFAULT_METHODS); "
                    "unregistered names and methods of another task are skipped")
    ap.add_argument("--precisions", default=None,
                    help=f"comma-separated, from {','.join(PRECISIONS)} (default fp32,bf16-cl; with --quick: "
                    "fp32 on the first model, bf16-cl on the second)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per measurement (default 10; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up batches (default 3; quick 1)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new measurement after this")
    ap.add_argument("--quick", action="store_true", help="tiny batches and images (CPU smoke test)")
    ap.add_argument("--confident", action="store_true",
                    help="scale the classifier's weights ×50 so that predictions are confident (CoTTA then skips "
                    "its augmented teacher views, as on a trained model's easy batches)")
    ap.add_argument("--profile", default=None, metavar="METHOD",
                    help="also print torch.profiler's top operators for this method's timed batches")
    return ap.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pool_of_batches(n: int, batch: int, size: int, device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(n):
        x = (torch.rand(batch, 3, size, size, generator=gen) - MEAN[0]) / STD[0]
        x = x.to(device)
        out.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return out


def measure(name: str, base: torch.nn.Module, spec: tuple, precision: str, channels_last: bool, compiled: bool,
            device: torch.device, warmup: int, timed: int, profile: bool = False) -> dict:
    _, _, batch, size, classes, task = spec
    pool = pool_of_batches(4, batch, size, device, channels_last)
    model = copy.deepcopy(base)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = get_method_info(name)

    def iterate():
        for i, x in enumerate(pool):
            yield x, torch.arange(i * batch, (i + 1) * batch, device=device)

    ctx = MethodContext(num_classes=classes, device=device, batch_size=batch, epochs=1,
                        dataset_size=len(pool) * batch, seed=0, precision=precision, iterate_target=iterate,
                        input_mean=MEAN, input_std=STD, task=task)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    method_cls = get_method(name)
    if device.type == "cuda":  # as the runner does: no cuDNN autotuning for step-varying batch sizes
        torch.backends.cudnn.benchmark = not method_cls.dynamic_shapes
    extra = EXTRA_PARAMS.get((name, task), lambda c: {})(classes)
    method = method_cls(model, validate_params(info, extra, task), ctx)
    if compiled:  # what the runner does for options.compile "on"
        Compiling("on", device, method_cls.dynamic_shapes, timed + warmup, batch).apply(method.model)
    method.begin_epoch(0)
    batches = list(iterate())
    sync(device)
    t_warm = time.perf_counter()
    for i in range(warmup):
        x, idx = batches[i % len(batches)]
        method.adapt(x, idx)
    sync(device)
    warm_seconds = time.perf_counter() - t_warm
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = torch.profiler.profile(activities=acts)
        prof.__enter__()
    t0 = time.perf_counter()
    out = None
    for i in range(timed):
        x, idx = batches[(warmup + i) % len(batches)]
        out = method.adapt(x, idx)
    sync(device)
    seconds = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n<!-- profile of {name}, {timed} batches, {seconds:.3f} s wall -->\n```", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=48), flush=True)
        print("```\n", flush=True)
    finite = bool(torch.isfinite(out.logits).all()) if out is not None else True
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    notes = []
    report = method.report()
    if "augmentation_averaged_batches" in report:
        notes.append(f"aug {report['augmentation_averaged_batches']}/{report['batches']}")
    if compiled:
        notes.append(f"warm-up incl. compile {warm_seconds:.0f} s")
    if not finite:
        notes.append("NON-FINITE OUTPUT")
    return {"images_per_s": batch * timed / seconds, "ms_per_batch": 1000 * seconds / timed,
            "peak_gib": peak / 2**30, "notes": ", ".join(notes)}


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v / 1000:.2f}k" if v >= 1000 else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    timed = args.batches if args.batches is not None else (1 if quick else 10)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.precisions is None and quick:
        per_model = {m: [("fp32", "bf16-cl")[min(i, 1)]] for i, m in enumerate(models)}
    else:
        chosen = [p.strip() for p in (args.precisions or "fp32,bf16-cl").split(",") if p.strip()]
        per_model = {m: chosen for m in models}
    precisions = sorted({p for ps in per_model.values() for p in ps})
    from worker.adaptation.methods import _load_all  # noqa: F401  (registers every method)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    missing = [m for m in wanted or [] if m not in METHODS]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)) if quick else torch.get_num_threads())
    table = QUICK_MODELS if quick else MODELS
    for p in precisions:
        if p not in PRECISIONS:
            raise SystemExit(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    for m in models:
        if m not in table:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(table)}")

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# Adaptation throughput — {dev_name}, torch {torch.__version__}"
          f"{' (QUICK: tiny sizes, not comparable)' if quick else ''}")
    print(f"warm-up {warmup}, timed {timed} batches per row; random inputs on the device; catalogue-default params")
    if missing:
        print(f"not registered, skipped: {', '.join(missing)}")
    print()
    print("| model | batch×px | method | precision | img/s | ms/batch | peak GiB | ref img/s (fp32) | ratio | notes |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
    start = time.perf_counter()
    for mname in models:
        spec = table[mname]
        arch, kwargs, batch, size, classes, task = spec
        methods = [m for m in (wanted or DEFAULT_METHODS[task]) if m in METHODS and task in get_method_info(m).tasks]
        torch.manual_seed(0)
        base = build(arch, classes, **kwargs).to(device)
        if args.confident:
            with torch.no_grad():
                for p in classifier_of(base).parameters():
                    p.mul_(50.0)
        for precision in per_model[mname]:
            prec, cl, compiled = PRECISIONS[precision]
            for name in methods:
                ref = REFERENCE.get(mname, {}).get(name)
                row = f"| {mname} | {batch}×{size} | {name} | {precision} |"
                if time.perf_counter() - start > args.budget_s:
                    print(f"{row} — | — | — | {fmt_rate(ref)} | — | skipped (budget) |", flush=True)
                    continue
                try:
                    r = measure(name, base, spec, prec, cl, compiled, device, warmup, timed,
                                profile=name == args.profile)
                except torch.cuda.OutOfMemoryError:
                    print(f"{row} — | — | — | {fmt_rate(ref)} | — | out of memory |", flush=True)
                    continue
                except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others
                    msg = str(exc).splitlines()[0][:80] if str(exc) else ""
                    print(f"{row} — | — | — | {fmt_rate(ref)} | — | error: {type(exc).__name__}: {msg} |",
                          flush=True)
                    continue
                ratio = f"{r['images_per_s'] / ref:.2f}×" if ref and not quick else "—"
                notes = r["notes"]
                if name == "tent" and precision == "bf16-cl" and not quick:
                    anchor = REFERENCE_TENT_BF16.get(mname)
                    if anchor:
                        notes = (notes + ", " if notes else "") + \
                            f"plain TENT bf16+cl anchor {fmt_rate(anchor)}: {r['images_per_s'] / anchor:.2f}×"
                print(f"{row} {fmt_rate(r['images_per_s'])} | {r['ms_per_batch']:.1f} | {r['peak_gib']:.2f} | "
                      f"{fmt_rate(ref)} | {ratio} | {notes} |", flush=True)
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
