"""Multi-source and label-free selection benchmark on real digits (issue 12), printed as markdown tables.

Part `pool` (DistillNearest / DistillWeighted, Borup et al. ICCV 2023): three `digit_cnn` (width 32) source
models, each trained on one digit domain of `../shared/data` in MNIST framing at 32 px (mnist_train5k,
usps_train, the first 1200 scikit-learn digits), and four targets none of them was trained on:
  usps_fill     usps_test, plain resize 16→28 (the digit fills the frame) + 2 px padding
  mnist_thick   MNIST test images 5000.., strokes thickened (3×3 grey dilation), padded 2 px
  mnist_small   MNIST test images 6000.., digits shrunk to 14 px and centred
  sklearn_fill  scikit-learn digits 1200.. (held out from its source), plain resize 8→28 + 2 px padding
(at most `--n-target` images each, a fixed subsample). Per target: `--n-labelled` labelled images per class (the few labels the paper assumes), every target
image unlabelled (transductive, like BENCHMARKS.md's digits table), accuracy on every target image. A
`digit_cnn` width 16 student (a quarter of the teachers' compute) is trained with `worker.adaptation.distill`
from each single source (so the labelled oracle's pick is known), DistillNearest's pick, DistillWeighted,
and the labels alone.

Part `auto` (label-free choice among adaptation methods): the digits benchmark's MNIST source model and
shifts (M→USPS and MNIST-test corruptions at severity 2, from benchmarks/digits_benchmark.py), every
candidate run through the service's runner; each label-free criterion of `worker.adaptation.estimation`
picks one, beside the best candidate by true accuracy.

Estimators: every (model, target) pair of both parts scores the label-free accuracy estimates against the
true accuracy (mean absolute error, points); the calibrated one is fitted leaving each target out.

    nice -n 10 .venv/bin/python benchmarks/multisource_benchmark.py            # both parts
    .venv/bin/python benchmarks/multisource_benchmark.py --parts pool --targets usps_fill
    .venv/bin/python benchmarks/multisource_benchmark.py --rows a.json,b.json   # tables; pool rows merged per target
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for p in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import digits_benchmark as DB  # noqa: E402  (data helpers and the MNIST source model of the digits table)

CACHE = DB.CACHE
TARGETS = ["usps_fill", "mnist_thick", "mnist_small", "sklearn_fill"]
AUTO_SHIFTS = ["usps", "gaussian_noise", "defocus_blur", "contrast", "fog"]
AUTO_CANDIDATES = ["bn_adapt", "tent", "eata", "shot", "nrc"]
CRITERIA = ["bounded_confidence", "confidence", "agreement", "snd"]
MEAN, STD = [0.5], [0.5]
SOURCE_KW = {"width": 32}
STUDENT_KW = {"width": 16, "bottleneck": 64}
log = DB.log


# --- data ----------------------------------------------------------------------------------------

def resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(x).float()[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return t[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def dilate(x: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    return F.max_pool2d(torch.from_numpy(x).float()[:, None], 3, stride=1, padding=1)[:, 0].to(torch.uint8).numpy()


def domains(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (uint8 N×32×32, labels): the three source domains and the four targets."""
    mx, my = DB.load_npz(data / "mnist_train5k.npz")
    tx, ty = DB.load_npz(data / "mnist_test.npz")
    ux, uy = DB.load_npz(data / "usps_train.npz")
    vx, vy = DB.load_npz(data / "usps_test.npz")
    sx, sy = DB.load_npz(data / "sklearn_digits8x8.npz")
    small = DB.pad(resize(tx[6000:7000], 14), 9)
    return {
        "mnist": (DB.pad(mx, 2), my),  # the digits table's source data; its model comes from DB.source_model
        "usps": (DB.usps_32(ux), uy),
        "sklearn": (DB.pad(resize(sx[:1200], 20), 6), sy[:1200]),
        "usps_fill": (DB.pad(resize(vx, 28), 2), vy),
        "mnist_thick": (DB.pad(dilate(tx[5000:6000]), 2), ty[5000:6000]),
        "mnist_small": (small, ty[6000:7000]),
        "sklearn_fill": (DB.pad(resize(sx[1200:], 28), 2), sy[1200:]),
    }


def to_tensor(x: np.ndarray):
    import torch

    from worker.adaptation.data import Preprocess

    return Preprocess(size=None, channels=1, mean=MEAN, std=STD)(torch.from_numpy(x)[..., None], torch.device("cpu"))


# --- models --------------------------------------------------------------------------------------

def train_source(name: str, x: np.ndarray, y: np.ndarray, epochs: int, seed: int):
    """A digit_cnn trained on one domain, cached by its recipe (the MNIST one is the digits table's)."""
    import torch

    from worker.adaptation.data import Preprocess
    from worker.adaptation.device import seed_everything
    from worker.adaptation.models import build_model
    from worker.adaptation.models.export import save_safetensors
    from worker.adaptation.models.loading import load_model
    from worker.adaptation.training import train_classifier

    recipe = {"arch": "digit_cnn", "kwargs": SOURCE_KW, "epochs": epochs, "seed": seed, "data": name, "n": len(x),
              "mean": MEAN, "std": STD, "torch": torch.__version__.split("+")[0]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"multisource_{name}_{key}.safetensors"
    if not path.exists():
        log(f"training the {name} source ({len(x)} images, {epochs} epochs)")
        seed_everything(seed)
        model = train_classifier(build_model("digit_cnn", 10, **SOURCE_KW), x, y,
                                 Preprocess(size=None, channels=1, mean=MEAN, std=STD), epochs=epochs, seed=seed)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, path, {"recipe": json.dumps(recipe)})
    model, _ = load_model("digit_cnn", 10, SOURCE_KW, path, None)
    return model.eval()


def predict(model, x, batch_size: int = 256):
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)])


def accuracy(probs, y) -> float:
    return float((probs.argmax(1) == y).float().mean())


def save_partial(args, part: str, rows: list[dict]) -> None:
    """Rows so far (a long run interrupted still leaves its finished targets): `<json>.<part>.partial`."""
    CACHE.mkdir(parents=True, exist_ok=True)
    Path(f"{args.json}.{part}.partial").write_text(json.dumps({"machine": DB.machine(), part: rows}, indent=1))


# --- part: pool ----------------------------------------------------------------------------------

def labelled_indices(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(10)]))


def run_pool(args, doms) -> list[dict]:
    import torch

    from worker.adaptation import distill as D
    from worker.adaptation import estimation as E
    from worker.adaptation import transferability as T
    from worker.adaptation.device import seed_everything
    from worker.adaptation.models import build_model

    from worker.adaptation.models.loading import load_model

    names = ["mnist", "usps", "sklearn"]
    # The MNIST source is the digits table's model (same recipe, same cache file, 50k image-steps); the
    # others get 36k (usps_train has 7291 images) and 30k (the sklearn part has 1200): bounded CPU time.
    mnist, _ = load_model("digit_cnn", 10, SOURCE_KW, DB.source_model(auto_namespace(args)), None)
    sources = [mnist.eval(), train_source("usps", *doms["usps"], 5, args.seed),
               train_source("sklearn", *doms["sklearn"], 25, args.seed)]
    from app.contract.catalog.multimodel import DistillWeightedParams

    params = DistillWeightedParams().model_dump()
    params.update(args.param)
    cfg = D.DistillConfig.from_params(params, epochs=args.distill_epochs, seed=args.seed)
    cfg_pl = D.DistillConfig.from_params({**params, "pseudo_label_weight": 1.0}, epochs=args.distill_epochs,
                                         seed=args.seed)
    rows = []
    for target in args.targets:
        t0 = time.perf_counter()
        xn, yn = doms[target]
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(xn))[:args.n_target])
        xn, yn = xn[keep], yn[keep]
        x, y = to_tensor(xn), torch.from_numpy(yn)
        lab = torch.from_numpy(labelled_indices(yn, args.n_labelled, args.seed))

        def batches(order=None, bs=64):
            order = np.arange(len(x)) if order is None else order
            for s in range(0, len(order), bs):
                idx = torch.from_numpy(np.asarray(order[s:s + bs]))
                yield x[idx], idx

        outs = [D.source_outputs(m, batches(), same_label_space=True) for m in sources]
        own = [T.source_similarity(o.features, o.probs, 10) for o in outs]
        labelled = [T.source_similarity(o.features, None, 10, (o.features[lab], y[lab])) for o in outs]
        # GBC on the labelled images alone, with their true labels (Pandy et al.'s protocol for a
        # transferability metric), beside the default's labelled-centroid pseudo-labels on every image
        true_labels = [T.similarity(T.gbc(o.features[lab], y[lab], 10)) for o in outs]
        weights = T.similarity_weights(labelled)

        def student(w, c=cfg) -> tuple[float, object]:
            seed_everything(args.seed)
            st = build_model("digit_cnn", 10, **STUDENT_KW)
            D.train_student(st, batches, outs, w, (x[lab], y[lab]), c, torch.device("cpu"), len(x))
            p = predict(st, x)
            return accuracy(p, y), p

        pick = int(np.argmax(labelled))
        one_hot = torch.eye(len(names))
        trained: dict[str, tuple[float, object]] = {}
        per_source = [student(one_hot[i]) for i in range(len(names))] if "single" in args.students else None
        if per_source is not None:
            trained["nearest"] = per_source[pick]
        elif "nearest" in args.students:
            trained["nearest"] = student(one_hot[pick])
        if "weighted" in args.students:
            trained["weighted"] = student(weights)
        if "labels_only" in args.students:
            trained["labels_only"] = student(torch.zeros(len(names)))
        if "pseudo_labels" in args.students:  # the same two with pseudo-label distillation on (weight 1)
            trained["nearest_pl"] = student(one_hot[pick], cfg_pl)
            trained["weighted_pl"] = student(weights, cfg_pl)
        row = {"target": target, "n": len(x), "n_labelled": len(lab), "sources": [], "pick": pick,
               "pick_own": int(np.argmax(own)), "pick_true_labels": int(np.argmax(true_labels)),
               "oracle_source": int(np.argmax([accuracy(o.probs, y) for o in outs])),
               "oracle_student": None if per_source is None else int(np.argmax([a for a, _ in per_source])),
               **{k: a for k, (a, _) in trained.items()}, "estimates": []}
        for i, (name, o) in enumerate(zip(names, outs)):
            row["sources"].append({"name": name, "similarity_own": own[i], "similarity_labelled": labelled[i],
                                   "similarity_true_labels": true_labels[i],
                                   "weight": float(weights[i]), "accuracy": accuracy(o.probs, y),
                                   "student_accuracy": None if per_source is None else per_source[i][0]})
        models = [(f"source:{n}", o.probs) for n, o in zip(names, outs)] + \
                 ([(f"student:{n}", p) for n, (_, p) in zip(names, per_source)] if per_source else []) + \
                 [(f"student:{k}", p) for k, (_, p) in trained.items() if k != "nearest" or per_source is None]
        ensemble = [p for _, p in models]
        for name, p in models:
            t = E.atc_threshold(p[lab], y[lab])
            row["estimates"].append({"model": name, "accuracy": accuracy(p, y), "confidence": E.average_confidence(p),
                                     "bounded_confidence": E.bounded_confidence(p),
                                     "agreement": E.ensemble_agreement(p, ensemble), "atc_labelled": E.atc(p, t)})
        rows.append(row)
        save_partial(args, "pool", rows)
        log(f"pool {target}: sources {[round(s['accuracy'], 3) for s in row['sources']]} "
            f"students {[round(a, 3) for a, _ in per_source or []]} "
            f"{ {k: round(a, 3) for k, (a, _) in trained.items()} }  {time.perf_counter() - t0:.0f}s")
    return rows


# --- part: auto ----------------------------------------------------------------------------------

def auto_namespace(args) -> argparse.Namespace:
    """The digits benchmark's arguments: its data helpers and its (cached) MNIST source model."""
    return argparse.Namespace(data=args.data, shifts=args.auto_shifts, n_usps=args.n_auto, n_mnist=args.n_auto,
                              usps_adapt="test", severity=2, seed=args.seed, threads=args.threads)


def run_auto(args) -> list[dict]:
    import torch

    from worker.adaptation import estimation as E
    from app.contract.catalog import get_method_info
    from worker.adaptation.models.loading import load_model
    from worker.adaptation.runner import RunRequest, run

    ns = auto_namespace(args)
    targets = DB.prepare_targets(ns)
    model_path = DB.source_model(ns)
    rows = []
    for shift, (adapt_path, eval_path) in targets.items():
        if adapt_path != eval_path:
            raise SystemExit("the auto part adapts and scores on the same images")
        with np.load(eval_path) as a:
            x, y = to_tensor(a["x"]), torch.from_numpy(a["y"].astype(np.int64))
        cands = []
        for method in ["source"] + args.candidates:
            t0 = time.perf_counter()
            info = get_method_info(method)
            params = {k: v for k, v in DB.DIGITS_PARAMS.items() if k in info.params_model.model_fields}
            with tempfile.TemporaryDirectory() as tmp:
                res = run(RunRequest.for_files(
                    model_path, adapt_path, tmp, method=method, params=params,
                    model={"architecture": "digit_cnn", "arch_kwargs": DB.ARCH_KWARGS, "num_classes": 10},
                    preprocess={"size": None, "channels": 1, "mean": MEAN, "std": STD},
                    options={"batch_size": 64, "epochs": args.sfda_epochs if info.kind == "sfda" else 1,
                             "seed": args.seed}))
                model, _ = load_model("digit_cnn", 10, DB.ARCH_KWARGS, Path(tmp) / "model.safetensors", None)
            p = predict(model, x)
            cands.append({"method": method, "probs": p, "accuracy": accuracy(p, y),
                          "runner_estimate": res.metrics["estimated_accuracy_after"]})
            log(f"auto {shift} {method}: acc {cands[-1]['accuracy']:.3f}  {time.perf_counter() - t0:.0f}s")
        pool = [c for c in cands if c["method"] != "source"]
        probs = [c["probs"] for c in pool]
        row = {"shift": shift, "source_accuracy": cands[0]["accuracy"],
               "candidates": [{"method": c["method"], "accuracy": c["accuracy"]} for c in pool],
               "scores": {k: E.selection_scores(probs, k) for k in CRITERIA}, "estimates": []}
        for c in cands:
            row["estimates"].append({"model": c["method"], "accuracy": c["accuracy"],
                                     "confidence": E.average_confidence(c["probs"]),
                                     "bounded_confidence": E.bounded_confidence(c["probs"]),
                                     "agreement": E.ensemble_agreement(c["probs"], probs)})
        rows.append(row)
        save_partial(args, "auto", rows)
    return rows


# --- tables --------------------------------------------------------------------------------------

def merge_pool_rows(rows: list[dict]) -> list[dict]:
    """Rows of one target from runs that trained different `--students` (same sources and data), merged:
    every value a later row has (not None) is kept, per source too; estimates once per model."""
    merged: dict[str, dict] = {}
    for r in rows:
        m = merged.get(r["target"])
        if m is None:
            merged[r["target"]] = json.loads(json.dumps(r))
            continue
        if m["pick"] != r["pick"]:
            raise SystemExit(f"{r['target']}: the runs' similarities differ (other sources?): not merged")
        m.update({k: v for k, v in r.items() if v is not None and k not in ("sources", "estimates")})
        for ms, rs in zip(m["sources"], r["sources"]):
            ms.update({k: v for k, v in rs.items() if v is not None})
        known = {e["model"] for e in m["estimates"]}
        m["estimates"] += [e for e in r["estimates"] if e["model"] not in known]
    return list(merged.values())


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def pool_tables(rows: list[dict]) -> str:
    def cell(v) -> str:
        return "–" if v is None else pct(v)

    out = ["### Sources: similarity against true accuracy", "",
           "| target | source | similarity (own pred.) | similarity (labelled centroids) | similarity (labelled "
           "images, true labels) | weight | source acc % | single-source student acc % |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for i, s in enumerate(r["sources"]):
            mark = " ◀ pick" if i == r["pick"] else ""
            true = s.get("similarity_true_labels")
            out.append(f"| {r['target']} | {s['name']}{mark} | {s['similarity_own']:.2f} | {s['similarity_labelled']:.2f} | "
                       f"{'–' if true is None else f'{true:.2f}'} | {s['weight']:.2f} | {pct(s['accuracy'])} | "
                       f"{cell(s.get('student_accuracy'))} |")
    out += ["", "### Students (digit_cnn width 16) against the sources", "",
            "| target | n (labelled) | best source acc % | labels only % | DistillNearest % (pick) | "
            "DistillWeighted % | DistillNearest + pseudo-labels % | DistillWeighted + pseudo-labels % | "
            "pick = oracle? (source acc / student acc) |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        names = [s["name"] for s in r["sources"]]
        best = max(s["accuracy"] for s in r["sources"])
        ok = lambda i: "–" if i is None else "yes" if i == r["pick"] else f"no ({names[i]})"  # noqa: E731
        out.append(f"| {r['target']} | {r['n']} ({r['n_labelled']}) | {pct(best)} | {cell(r.get('labels_only'))} | "
                   f"{cell(r.get('nearest'))} ({names[r['pick']]}) | {cell(r.get('weighted'))} | "
                   f"{cell(r.get('nearest_pl'))} | {cell(r.get('weighted_pl'))} | "
                   f"{ok(r['oracle_source'])} / {ok(r.get('oracle_student'))} |")
    return "\n".join(out)


def auto_table(rows: list[dict]) -> str:
    cands = [c["method"] for c in rows[0]["candidates"]]
    criteria = [k for k in CRITERIA if k in rows[0]["scores"]]  # rows saved by older runs may lack some
    head = ["shift", "source"] + cands + ["best"] + [f"pick: {k}" for k in criteria]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    gaps = {k: [] for k in criteria}
    for r in rows:
        accs = [c["accuracy"] for c in r["candidates"]]
        best = max(accs)
        cells = [r["shift"], pct(r["source_accuracy"])] + [pct(a) for a in accs] + [pct(best)]
        for k in criteria:
            i = int(np.argmax(r["scores"][k]))
            gaps[k].append(best - accs[i])
            cells.append(f"{cands[i]} {pct(accs[i])}")
        out.append("| " + " | ".join(cells) + " |")
    out.append("| mean gap to best (pts) | | " + " | " * len(cands) + " | "
               + " | ".join(f"{100 * np.mean(gaps[k]):.1f}" for k in criteria) + " |")
    return "\n".join(out)


def estimator_table(points: list[dict]) -> str:
    """points: {group, accuracy, confidence, agreement, [atc_labelled]}; calibrated = linear fit of accuracy
    on confidence, fitted on every other group (leave one target out)."""
    groups = sorted({p["group"] for p in points})
    for p in points if len(groups) > 1 else []:
        rest = [q for q in points if q["group"] != p["group"]]
        a, b = np.polyfit([q["confidence"] for q in rest], [q["accuracy"] for q in rest], 1)
        p["confidence_calibrated"] = float(np.clip(a * p["confidence"] + b, 0, 1))
    names = ["confidence", "confidence_calibrated", "bounded_confidence", "agreement", "atc_labelled"]
    out = ["| estimator | points | MAE (pts) | max error (pts) | mean signed error (pts) |", "|---|---:|---:|---:|---:|"]
    for n in names:
        pts = [p for p in points if n in p]
        if not pts:
            continue
        e = np.array([p[n] - p["accuracy"] for p in pts])
        out.append(f"| {n} | {len(pts)} | {100 * np.abs(e).mean():.1f} | {100 * np.abs(e).max():.1f} | {100 * e.mean():+.1f} |")
    out.append(f"\n({len(groups)} targets: {', '.join(groups)})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DB.DEFAULT_DATA))
    ap.add_argument("--parts", default="pool,auto")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--n-labelled", type=int, default=10, help="labelled target images per class (pool)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="override a distillation param (catalogue defaults otherwise), e.g. kd_weight=0")
    ap.add_argument("--n-target", type=int, default=1000, help="target images per pool target (a fixed subsample)")
    ap.add_argument("--distill-epochs", type=int, default=12)
    ap.add_argument("--students", default="single,weighted,labels_only,pseudo_labels",
                    help="pool students to train: single (one per source; gives DistillNearest and the oracle), "
                         "nearest (DistillNearest alone, without single), weighted, labels_only, pseudo_labels "
                         "(DistillNearest and DistillWeighted again with pseudo_label_weight=1)")
    ap.add_argument("--auto-shifts", default=",".join(AUTO_SHIFTS))
    ap.add_argument("--candidates", default=",".join(AUTO_CANDIDATES))
    ap.add_argument("--n-auto", type=int, default=1000, help="target images per auto shift")
    ap.add_argument("--sfda-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(CACHE / "multisource_results.json"))
    ap.add_argument("--rows", help="print the tables from saved --json files (comma-separated) instead of running")
    args = ap.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.students = [t for t in args.students.split(",") if t]
    args.auto_shifts = [t for t in args.auto_shifts.split(",") if t]
    args.candidates = [t for t in args.candidates.split(",") if t]
    parts = args.parts.split(",")
    args.param = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (p.split("=", 1) for p in args.param)}

    if args.rows:  # several files (e.g. one run per part): their rows are concatenated per part
        result = {"machine": "", "seconds": 0.0}
        for f in args.rows.split(","):
            saved = json.loads(Path(f).read_text())
            result["machine"] = saved["machine"]
            result["seconds"] += saved.get("seconds", 0.0)
            for part in ("pool", "auto"):
                result[part] = result.get(part, []) + saved.get(part, [])
        result["pool"] = merge_pool_rows(result["pool"])
    else:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        result = {"machine": DB.machine(), "args": {k: v for k, v in vars(args).items()}}
        if "pool" in parts:
            result["pool"] = run_pool(args, domains(Path(args.data)))
        if "auto" in parts:
            result["auto"] = run_auto(args)
        result["seconds"] = time.perf_counter() - t0
        CACHE.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}; {result.get('seconds', 0):.0f} s\n")
    points = []
    if result.get("pool"):
        print(pool_tables(result["pool"]) + "\n")
        points += [dict(e, group=r["target"]) for r in result["pool"] for e in r["estimates"]]
    if result.get("auto"):
        print("### auto: label-free pick among adaptation methods (accuracy %)\n\n" + auto_table(result["auto"]) + "\n")
        points += [dict(e, group=r["shift"]) for r in result["auto"] for e in r["estimates"]]
    if points:
        print("### Label-free accuracy estimates against the true accuracy\n\n" + estimator_table(points))


if __name__ == "__main__":
    main()
