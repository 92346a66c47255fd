"""Digits benchmark: every registered adaptation method through the service's own runner,
on real digit domain shifts, printed as one markdown table.

Source model: a `digit_cnn` (width 32) trained on `mnist_train5k` with the engine's `train_classifier`
(cached under benchmarks/.cache/). Inputs are 32×32: MNIST padded 2 px; USPS in MNIST framing
(16→20 px + 4 px padding, as in the data README) padded 2 px more.

Targets:
- `usps`: MNIST→USPS, usps_test (2007 images). By default the methods adapt on usps_test and are scored
  on it (transductive, what a service user does with the data they have); `--usps-adapt train` follows the
  SHOT paper's protocol instead (adapt on usps_train, 7291 images; score on usps_test).
- MNIST test (the first `--n-mnist` images) under ImageNet-C corruptions from `imagecorruptions-imaug`
  (`pip install -e '.[bench]'`) at `--severity` (default 2), applied at 32 px, one fixed numpy seed per
  corruption: repeatable.

Every method runs with its catalogue defaults (the authors'), except that horizontal flips are turned off
in the augmentations of the methods that have them (`hflip`: a mirrored digit is another symbol);
`--param METHOD.KEY=VALUE` overrides any param.

Per method and target: error % of the adapted model in eval mode with BatchNorm statistics re-estimated on
the target (the runner's `accuracy_after`: what a user downloads); for test-time methods also the online
error (each batch predicted before the model adapts on it, `metrics["online"]`). Images/second is the
runner's adaptation-loop throughput (SFDA: training images per second over all epochs); peak memory is the
runner's figure (CUDA: peak allocated; CPU: the worker process's peak RSS; each method runs in a fresh
process so the figure is its own).

    nice -n 10 .venv/bin/python benchmarks/digits_benchmark.py            # full table
    .venv/bin/python benchmarks/digits_benchmark.py --quick               # smoke run (a few minutes)
    .venv/bin/python benchmarks/digits_benchmark.py --methods shot --shifts usps --usps-adapt train \
        --sfda-epochs 30                                                  # SHOT paper protocol, M→U
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CACHE = REPO_ROOT / "benchmarks" / ".cache"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_SHIFTS = ["usps", "gaussian_noise", "defocus_blur", "contrast", "fog"]
ARCH = "digit_cnn"
ARCH_KWARGS = {"width": 32}
SOURCE_EPOCHS = 10
MEAN, STD = [0.5], [0.5]
# Digits are not mirror-symmetric: methods whose augmentations include horizontal flips (made for natural
# images) get them turned off, as their params' descriptions advise. Every other param keeps its default.
DIGITS_PARAMS = {"hflip": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------

def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise SystemExit(f"missing {path}: pass --data pointing at the shared digits folder (see its README)")
    with np.load(path, allow_pickle=False) as a:
        return a["x"], a["y"].astype(np.int64)


def pad(x: np.ndarray, p: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (p, p), (p, p)))


def usps_32(x: np.ndarray) -> np.ndarray:
    """USPS 16 px -> MNIST framing (20 px digit, 4 px padding: 28 px) -> 32 px like padded MNIST."""
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(x).float()[:, None], size=(20, 20), mode="bilinear", align_corners=False)
    return pad(t[:, 0].round().clamp(0, 255).to(torch.uint8).numpy(), 6)


def corrupt(x32: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    try:
        from imagecorruptions import corrupt as ic_corrupt
    except ImportError:
        raise SystemExit("the corruption shifts need imagecorruptions-imaug: pip install -e '.[bench]'") from None
    np.random.seed(seed)  # the package draws from numpy's global generator
    out = np.empty_like(x32)
    for i, im in enumerate(x32):
        c = ic_corrupt(im, corruption_name=name, severity=severity)
        out[i] = c[..., 0] if c.ndim == 3 else c  # grayscale in, 3 equal channels out (noise: channel 0)
    return out


def prepare_targets(args) -> dict[str, tuple[Path, Path]]:
    """shift name -> (adaptation npz, evaluation npz), cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    targets = {}
    for shift in args.shifts:
        if shift == "usps":
            ev = CACHE / f"usps_test_32_n{args.n_usps}.npz"
            if not ev.exists():
                x, y = load_npz(data / "usps_test.npz")
                np.savez(ev, x=usps_32(x[:args.n_usps]), y=y[:args.n_usps])
            ad = ev
            if args.usps_adapt == "train":
                ad = CACHE / "usps_train_32.npz"
                if not ad.exists():
                    x, y = load_npz(data / "usps_train.npz")
                    np.savez(ad, x=usps_32(x), y=y)
            targets[shift] = (ad, ev)
        else:
            path = CACHE / f"mnist_test_32_{shift}_s{args.severity}_n{args.n_mnist}_seed{args.seed}.npz"
            if not path.exists():
                log(f"corrupting {args.n_mnist} MNIST test images: {shift} severity {args.severity}")
                x, y = load_npz(data / "mnist_test.npz")
                x32 = pad(x[:args.n_mnist], 2)
                np.savez(path, x=corrupt(x32, shift, args.severity, args.seed), y=y[:args.n_mnist])
            targets[shift] = (path, path)
    return targets


def source_model(args) -> Path:
    """digit_cnn trained on mnist_train5k (32 px), cached by its recipe."""
    import torch

    from worker.adaptation.data import Preprocess
    from worker.adaptation.device import seed_everything
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.training import train_classifier

    recipe = {"arch": ARCH, "kwargs": ARCH_KWARGS, "epochs": SOURCE_EPOCHS, "seed": args.seed, "data": "mnist_train5k",
              "pad": 2, "mean": MEAN, "std": STD, "torch": torch.__version__.split("+")[0]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"source_{ARCH}_{key}.safetensors"
    if not path.exists():
        log(f"training the source model ({ARCH} {ARCH_KWARGS}, {SOURCE_EPOCHS} epochs on mnist_train5k)")
        x, y = load_npz(Path(args.data) / "mnist_train5k.npz")
        torch.set_num_threads(args.threads)
        seed_everything(args.seed)
        model = train_classifier(build_model(ARCH, 10, **ARCH_KWARGS), pad(x, 2), y,
                                 Preprocess(size=None, channels=1, mean=MEAN, std=STD), epochs=SOURCE_EPOCHS,
                                 batch_size=64, seed=args.seed)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, path, {"recipe": json.dumps(recipe)})
    return path


# --- runs ----------------------------------------------------------------------------------------

def run_method(method: str, model_path: str, targets: dict, opts: dict) -> list[dict]:
    """One method over every target, in this (fresh) process."""
    import torch

    from app.contract.catalog import get_method_info
    from worker.adaptation.runner import RunRequest, run

    torch.set_num_threads(opts["threads"])
    info = get_method_info(method)
    kind = info.kind
    fields = info.params_model.model_fields
    params = {k: v for k, v in DIGITS_PARAMS.items() if k in fields}
    params.update(opts["params"].get(method, {}))
    rows = []
    for shift, (adapt_path, eval_path) in targets.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run(RunRequest.for_files(
                model_path, adapt_path, tmp, eval_path=eval_path, method=method, params=params,
                model={"architecture": ARCH, "arch_kwargs": ARCH_KWARGS, "num_classes": 10},
                preprocess={"size": None, "channels": 1, "mean": MEAN, "std": STD},
                options={"batch_size": opts["batch_size"], "epochs": opts["sfda_epochs"] if kind == "sfda" else 1,
                         "seed": opts["seed"], "device": opts["device"], "precision": opts["precision"]}))
            m = result.metrics
            online = m.get("online", {}).get("accuracy") if kind == "tta" and adapt_path == eval_path else None
            rows.append({"method": method, "kind": kind, "shift": shift, "accuracy_before": m["accuracy_before"],
                         "accuracy_after": m["accuracy_after"], "online": online,
                         "images_per_second": m["images_per_second"], "peak_memory_bytes": m["peak_memory_bytes"],
                         "collapse": m["collapse_detected"], "device": m["device"], "precision": m["precision"],
                         "params": params,
                         "seconds": time.perf_counter() - t0})
            log(f"  {method:9s} {shift:15s} err {100 * (1 - m['accuracy_after']):5.1f}%"
                + (f" online {100 * (1 - online):5.1f}%" if online is not None else "")
                + f"  (source {100 * (1 - m['accuracy_before']):5.1f}%)  {time.perf_counter() - t0:5.0f}s")
    return rows


def prepare(args) -> tuple[dict[str, tuple[str, str]], str, list[str]]:
    targets = prepare_targets(args)
    model_path = source_model(args)
    return ({k: (str(a), str(e)) for k, (a, e) in targets.items()}, str(model_path), registered_methods())


def in_child(fn, *args):
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def registered_methods() -> list[str]:
    from app.contract.catalog import CATALOG
    from worker.adaptation.methods.registry import METHODS, get_method

    get_method("source")  # imports every method module
    order = {"baseline": 0, "tta": 1, "sfda": 2}
    return sorted(METHODS, key=lambda n: (order.get(CATALOG[n].kind, 3), n != "source", n))


# --- table ---------------------------------------------------------------------------------------

SHIFT_TITLES = {"usps": "M→U"}


def err(acc: float) -> float:
    return 100.0 * (1.0 - acc)


def table(rows: list[dict], shifts: list[str], methods: list[str]) -> str:
    by = {(r["method"], r["shift"]): r for r in rows}
    source = {s: err(by[(methods[0], s)]["accuracy_before"]) for s in shifts if (methods[0], s) in by}
    head = ["method", "kind"] + [SHIFT_TITLES.get(s, s) for s in shifts] + \
        ["mean err", "gain vs source", "img/s", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for method in methods:
        cells, errs, gains, ips, mem = [], [], [], [], []
        kind = ""
        for s in shifts:
            r = by.get((method, s))
            if r is None:
                cells.append("–")
                continue
            kind = r["kind"]
            e = err(r["accuracy_after"])
            errs.append(e)
            gains.append(source[s] - e)
            ips.append(r["images_per_second"])
            mem.append(r["peak_memory_bytes"])
            cell = f"{e:.1f}"
            if r["online"] is not None:
                cell += f" / {err(r['online']):.1f}"
            if method != "source" and e >= source[s]:
                cell += " ✗"
            if r["collapse"]:
                cell += " †"
            cells.append(cell)
        if not errs:
            continue
        gain = "" if method == "source" else f"{np.mean(gains):+.1f}"
        speed = "–" if method == "source" and not any(ips) else f"{np.mean(ips):,.0f}"
        lines.append("| " + " | ".join([method, kind] + cells + [f"{np.mean(errs):.1f}", gain, speed,
                                                                  f"{max(mem) / 2**20:,.0f}"]) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the shared digits folder (default: %(default)s)")
    ap.add_argument("--methods", help="comma-separated (default: every registered method)")
    ap.add_argument("--shifts", help=f"comma-separated: usps and imagecorruptions names (default: "
                    f"{','.join(DEFAULT_SHIFTS)})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shifts, 500 images, 2 SFDA epochs")
    ap.add_argument("--severity", type=int, default=2)
    ap.add_argument("--n-mnist", type=int, default=2000, help="MNIST test images per corruption")
    ap.add_argument("--n-usps", type=int, default=2007, help="usps_test images scored (2007: all)")
    ap.add_argument("--usps-adapt", choices=["test", "train"], default="test",
                    help="adapt on usps_test (default) or on usps_train as the SHOT paper (scored on usps_test)")
    ap.add_argument("--sfda-epochs", type=int, default=10,
                    help="epochs of the SFDA methods (authors: SHOT 30 on digits, NRC/AaD 15 on VisDA)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="override a method's param (JSON value), e.g. --param shot.beta=0.3; repeatable")
    ap.add_argument("--json", help="also write the raw rows here")
    ap.add_argument("--rows", help="print the table from rows saved with --json (comma-separated files; a later "
                    "file's row replaces an earlier one for the same method and shift) instead of running")
    args = ap.parse_args(argv)
    if args.rows:
        print_rows(args.rows.split(","), args.shifts.split(",") if args.shifts else None)
        return
    overrides: dict[str, dict] = {}
    for item in args.param:
        try:
            key, value = item.split("=", 1)
            method, name = key.split(".", 1)
            overrides.setdefault(method, {})[name] = json.loads(value)
        except ValueError:
            raise SystemExit(f"--param {item!r}: expected METHOD.KEY=JSON_VALUE") from None

    args.shifts = args.shifts.split(",") if args.shifts else list(DEFAULT_SHIFTS)
    if args.quick:
        args.shifts = args.shifts[:2]
        args.n_mnist = min(args.n_mnist, 500)
        args.n_usps = min(args.n_usps, 500)
        args.sfda_epochs = min(args.sfda_epochs, 2)
    # The parent process stays small and torch-free: everything else runs in fresh spawned processes,
    # because a child inherits its parent's peak-RSS figure (Linux ru_maxrss survives fork and exec).
    t0 = time.perf_counter()
    targets, model_path, methods = in_child(prepare, args)
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(methods))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; registered: {', '.join(methods)}")
        methods = ["source"] + [m for m in wanted if m != "source"]  # source: the reference row

    opts = {"threads": args.threads, "batch_size": args.batch_size, "sfda_epochs": args.sfda_epochs,
            "seed": args.seed, "device": args.device, "precision": args.precision, "params": overrides}
    rows: list[dict] = []
    for method in methods:
        log(f"{method}:")
        # a fresh process per method: its own peak-memory figure, nothing shared between methods
        rows += in_child(run_method, method, model_path, targets, opts)

    for r in rows:
        r["settings"] = {"usps_adapt": args.usps_adapt, "n_usps": args.n_usps, "n_mnist": args.n_mnist,
                         "severity": args.severity, "sfda_epochs": args.sfda_epochs, "batch_size": args.batch_size,
                         "threads": args.threads}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    device = rows[0]["device"] if rows else "?"
    usps_note = ("adapted on usps_train, scored on usps_test" if args.usps_adapt == "train"
                 else "adapted and scored on usps_test")
    print(LEGEND + f" M→U: {usps_note} ({args.n_usps} images); corruptions: first {args.n_mnist} MNIST test "
          f"images, severity {args.severity}. SFDA: {args.sfda_epochs} epochs; batch {args.batch_size}; device "
          f"{device}, precision {rows[0]['precision'] if rows else '?'}, {args.threads} thread(s); {machine()}. "
          f"Total {time.perf_counter() - t0:,.0f} s.\n")
    print(table(rows, args.shifts, methods))


LEGEND = ("Error % after adaptation (eval mode, BatchNorm re-estimated on the target) / online error % for "
          "test-time methods. ✗: not better than source; †: collapse guard fired. Gain: mean error reduction "
          "over the shifts vs source, percentage points.")


def print_rows(files: list[str], shifts: list[str] | None) -> None:
    merged: dict[tuple[str, str], dict] = {}
    for f in files:
        for r in json.loads(Path(f).read_text()):
            merged[(r["method"], r["shift"])] = r
    rows = list(merged.values())
    shifts = shifts or list(dict.fromkeys(r["shift"] for r in rows))
    order = {"baseline": 0, "tta": 1, "sfda": 2}
    methods = sorted({r["method"] for r in rows},
                     key=lambda n: (order.get(next(r["kind"] for r in rows if r["method"] == n), 3), n))
    settings = sorted({json.dumps(r.get("settings", {}), sort_keys=True) for r in rows})
    print(LEGEND + " Settings: " + "; ".join(settings) + "\n")
    print(table(rows, shifts, methods))


if __name__ == "__main__":
    main()
