"""Our adaptation engine against the reference implementation, on CPU, side by side in one process.

The reference is mariodoebler/test-time-adaptation, fetched by you outside this repository (nothing of
it is in this repository); --reference names its `classification` folder, and this script imports its
method classes from there. Their packages are loaded without their `__init__` (which imports every
method and its model zoo), and the two data/model helpers the methods import are replaced here by
small stand-ins: `datasets.data_loading.get_source_loader` (random batches: RMT extracts its source
prototypes from it; no warm-up and no source replay, the source-free variant ours implements) and
`models.model.split_up_model` (the model's feature extractor and its `fc`).

Same model (a WideResNet from worker.adaptation.models with the input normalisation inside, so both
take pixels in [0, 1]), same random inputs, same batch size, same torch thread count, same
hyper-parameters (our catalogue defaults, the authors' CIFAR settings, mapped onto their config keys).
For each method, --rounds times alternately: build ours / theirs, --warmup steps, then --batches timed
steps. Prints img/s per wall-clock second and per CPU second of the process (median over rounds) and
ours / reference for both.

    python benchmarks/engine_vs_reference.py --reference /work/scratch/tta-ref/classification \\
        [--methods bn_adapt,tent,eata,sar,cotta,rmt,roid] [--batch 64] [--size 32] [--threads 1] \\
        [--depth 16] [--widen 2] [--batches 3] [--warmup 1] [--rounds 2]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.contract.catalog import get_method_info  # noqa: E402
from worker.adaptation.methods import get_method  # noqa: E402
from worker.adaptation.methods.base import MethodContext  # noqa: E402
from worker.adaptation.models.wide_resnet import WideResNet  # noqa: E402

# our method name -> (their module, their class)
REFERENCE_CLASSES = {"bn_adapt": ("norm", "BNTest"), "tent": ("tent", "Tent"), "eata": ("eata", "EATA"),
                     "sar": ("sar", "SAR"), "cotta": ("cotta", "CoTTA"), "rmt": ("rmt", "RMT"),
                     "roid": ("roid", "ROID")}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)  # CIFAR-10, inside the model


class NormalizedWRN(WideResNet):
    """A WideResNet that normalises its [0, 1] input itself (as RobustBench models do, which the
    reference's augmentations assume)."""

    def __init__(self, depth: int, widen: int, classes: int):
        super().__init__(depth=depth, widen_factor=widen, num_classes=classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features((x - self.mean) / self.std)


class Cfg(dict):
    """Attribute access over nested dicts: the shape of the reference's yacs config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def cfg_for(name: str, p, batch: int, scratch: str) -> Cfg:
    """Their config keys, filled from our catalogue params `p` (defaults for what ours does not have)."""
    g = lambda key, default=None: getattr(p, key, default)  # noqa: E731
    c = lambda **kw: Cfg(kw)  # noqa: E731
    return c(
        MODEL=c(ARCH="Standard", EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ADAPTATION=name, CKPT_PATH="",
                WEIGHTS=""),
        CORRUPTION=c(DATASET="cifar10_c"), MIXED_PRECISION=False, DATA_DIR=scratch, CKPT_DIR=scratch,
        OPTIM=c(STEPS=g("steps", 1), LR=g("lr", 1e-3), METHOD="SGD" if g("optimizer") == "sgd" else "Adam",
                BETA=0.9, MOMENTUM=g("momentum", 0.9), DAMPENING=0.0, NESTEROV=True, WD=0.0),
        TEST=c(BATCH_SIZE=batch, WINDOW_LENGTH=1, N_AUGMENTATIONS=g("n_augmentations", 32)),
        BN=c(ALPHA=0.1), M_TEACHER=c(MOMENTUM=g("teacher_momentum", 0.999)),
        COTTA=c(RST=g("restore_prob", 0.01), AP=g("ap", 0.92)),
        EATA=c(FISHER_ALPHA=0.0, D_MARGIN=g("d_margin", 0.05), MARGIN_E0=g("e_margin", 0.4)),
        SAR=c(RESET_CONSTANT_EM=g("reset_constant_em", 0.2)),
        ROID=c(USE_WEIGHTING=g("use_weighting", True), USE_PRIOR_CORRECTION=g("use_prior_correction", True),
               USE_CONSISTENCY=g("use_consistency", True), MOMENTUM_SRC=g("momentum_src", 0.99),
               MOMENTUM_PROBS=g("momentum_probs", 0.9), TEMPERATURE=g("temperature", 1 / 3)),
        RMT=c(LAMBDA_CE_SRC=0.0, LAMBDA_CE_TRG=g("lambda_ce_trg", 1.0), LAMBDA_CONT=g("lambda_cont", 1.0),
              NUM_SAMPLES_WARM_UP=0),
        CONTRAST=c(TEMPERATURE=g("temperature", 0.1), PROJECTION_DIM=g("projection_dim", 128), MODE="all"),
        SOURCE=c(NUM_WORKERS=0, PERCENTAGE=1.0, NUM_SAMPLES=-1),
    )


def load_reference(folder: Path, batch: int, size: int, classes: int) -> dict[str, type]:
    folder = folder.resolve()
    if not (folder / "methods" / "base.py").exists():
        raise SystemExit(f"--reference {folder}: no methods/base.py (give the repository's classification folder)")
    sys.path.insert(0, str(folder))
    for pkg in ("methods", "utils", "augmentations", "models", "datasets"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(folder / pkg)]
        sys.modules[pkg] = mod

    class ResNetDomainNet126(nn.Module):  # only isinstance checks on it
        pass

    class Features(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.forward_features(x)

    stand_in = types.ModuleType("models.model")
    stand_in.ResNetDomainNet126 = ResNetDomainNet126
    stand_in.split_up_model = lambda model, arch_name, dataset_name: (Features(model), model.fc)
    sys.modules["models.model"] = stand_in

    gen = torch.Generator().manual_seed(1)
    source = [(torch.rand(batch, 3, size, size, generator=gen), torch.arange(batch) % classes) for _ in range(2)]
    loading = types.ModuleType("datasets.data_loading")
    loading.get_source_loader = lambda **_kw: (None, source)
    sys.modules["datasets.data_loading"] = loading
    return {ours: getattr(importlib.import_module(f"methods.{module}"), cls)
            for ours, (module, cls) in REFERENCE_CLASSES.items()}


def time_ours(name, base, pool, batch, classes, warmup, timed) -> float:
    model = copy.deepcopy(base)

    def iterate():
        for i, x in enumerate(pool):
            yield x, torch.arange(i * batch, (i + 1) * batch)

    ctx = MethodContext(num_classes=classes, device=torch.device("cpu"), batch_size=batch, epochs=1,
                        dataset_size=len(pool) * batch, seed=0, precision="fp32", iterate_target=iterate,
                        input_mean=(0.0,), input_std=(1.0,))  # the model normalises its [0, 1] input
    torch.manual_seed(0)
    method = get_method(name)(model, get_method_info(name).params_model(), ctx)
    method.begin_epoch(0)
    batches = list(iterate())
    for i in range(warmup):
        method.adapt(*batches[i % len(batches)])
    return timed_rates(lambda i: method.adapt(*batches[(warmup + i) % len(batches)]), batch, timed)


def time_reference(cls, name, base, pool, batch, classes, warmup, timed, scratch) -> float:
    model = copy.deepcopy(base)
    model.model_preprocess = None
    torch.manual_seed(0)
    method = cls(cfg_for(name, get_method_info(name).params_model(), batch, scratch), model, classes)
    for i in range(warmup):
        method(pool[i % len(pool)])
    return timed_rates(lambda i: method(pool[(warmup + i) % len(pool)]), batch, timed)


def timed_rates(step, batch: int, timed: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process). On a machine shared with
    other work the second is the steadier one: CPU time does not run while the process waits for a core."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(timed):
        step(i)
    return batch * timed / (time.perf_counter() - t0), batch * timed / (time.process_time() - c0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="the reference's classification folder")
    ap.add_argument("--methods", default=",".join(REFERENCE_CLASSES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: on a shared machine, OpenMP "
                    "barriers stall whenever one of several threads waits for a core)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--widen", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from worker.adaptation.methods import _load_all  # noqa: F401  (registers every method)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REFERENCE_CLASSES]
    if unknown:
        raise SystemExit(f"no reference class for {unknown}; known: {', '.join(REFERENCE_CLASSES)}")
    reference = load_reference(args.reference, args.batch, args.size, args.classes)
    torch.manual_seed(0)
    base = NormalizedWRN(args.depth, args.widen, args.classes)
    gen = torch.Generator().manual_seed(0)
    pool = [torch.rand(args.batch, 3, args.size, args.size, generator=gen) for _ in range(4)]
    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}; torch {torch.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; WRN-{args.depth}-"
          f"{args.widen}, batch {args.batch}×{args.size}px, {args.classes} classes, random inputs; "
          f"{args.warmup} warm-up + {args.batches} timed steps, {args.rounds} rounds alternating")
    print()
    print("| method | ours img/s (per round) | reference img/s (per round) | ours / reference, wall "
          "(median) | ours img/CPU-s | reference img/CPU-s | ours / reference, CPU (median) |")
    print("|---|---|---|---:|---|---|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in methods:
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(time_ours(name, base, pool, args.batch, args.classes, args.warmup, args.batches))
                theirs.append(time_reference(reference[name], name, base, pool, args.batch, args.classes,
                                             args.warmup, args.batches, scratch))
            row = [name]
            for k in (0, 1):
                o, t = statistics.median(v[k] for v in ours), statistics.median(v[k] for v in theirs)
                row += [" / ".join(f"{v[k]:.1f}" for v in ours), " / ".join(f"{v[k]:.1f}" for v in theirs),
                        f"{o / t:.2f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
