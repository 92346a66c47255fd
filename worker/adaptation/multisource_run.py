"""Jobs over several models, built on the runner's pieces:
- `run_distill`: DistillNearest / DistillWeighted, several source models -> one student (`distill`);
- `run_auto`: several adaptation methods on one model, one picked without labels (`estimation.choose`).
Both return the runner's `RunResult`; the exported model is the student / the pick."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import distill as D
from . import estimation as E
from . import metrics as M
from .data import open_image_set
from .device import peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision, seed_everything
from .errors import AdaptationError
from .methods.norm import has_batch_norm
from .models import build_model
from .models.export import recalibrate_batch_norm, save_safetensors
from .models.loading import load_model
from .runner import (RECALIBRATION_BATCHES, Hooks, NoHooks, RunRequest, RunResult, _check_input_shape, _open_eval,
                     _Prep, _take, predict, run)

MAX_LABELLED = 10_000  # the labelled target set is held in memory, preprocessed


@dataclass
class ModelInput:
    architecture: str
    num_classes: int
    arch_kwargs: dict = field(default_factory=dict)
    path: Path | None = None      # None: a freshly initialised student
    format: str | None = None


@dataclass
class DistillRequest:
    """`base` carries the method, params, data, eval data, preprocessing and options; its own model
    fields are unused. `labelled_path`: the optional small labelled target set."""

    base: RunRequest
    sources: list[ModelInput]
    student: ModelInput
    labelled_path: Path | None = None
    labelled_format: str | None = None


def _labelled(req: DistillRequest, prep: _Prep, num_classes: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if req.labelled_path is None:
        return None
    ds = open_image_set(req.labelled_path, req.labelled_format, preprocess_size=req.base.preprocess.size)
    if ds.labels is None:
        raise AdaptationError("labelled_data_unlabelled", "labelled_data must carry labels ('y' in npz, class "
                              "folders in archives)")
    if len(ds) > MAX_LABELLED:
        raise AdaptationError("labelled_data_too_large", f"labelled_data holds {len(ds)} images; at most "
                              f"{MAX_LABELLED} (it is the few labelled target images)", {"limit": MAX_LABELLED})
    if ds.labels.min() < 0 or ds.labels.max() >= num_classes:
        raise AdaptationError("label_out_of_range", f"labelled_data labels must lie in 0..{num_classes - 1}")
    xs = torch.cat([x for x, _ in prep.iterate(ds, 256)])
    return xs, torch.from_numpy(ds.labels.astype(np.int64)).to(xs.device)


def run_distill(req: DistillRequest, params: dict, cfg: D.DistillConfig, hooks: Hooks | None = None) -> RunResult:
    """`params`: the method's validated catalogue params, dumped (`temperature` for distill_weighted); `cfg`:
    the training settings (from the same params and the job's options)."""
    hooks = hooks or NoHooks()
    base = req.base
    mode = "nearest" if base.method == "distill_nearest" else "weighted"
    device = resolve_device(base.device)
    precision = resolve_precision(base.precision, device)
    seed_everything(base.seed)
    reset_peak_memory(device)
    hooks.progress(0, 0, "loading")
    sources, reports = [], []
    for s in req.sources:
        model, report = load_model(s.architecture, s.num_classes, s.arch_kwargs, s.path, s.format)
        sources.append(model.to(device).eval())
        reports.append(report)
    st = req.student
    if st.path is not None:
        student, _ = load_model(st.architecture, st.num_classes, st.arch_kwargs, st.path, st.format)
    else:
        try:
            student = build_model(st.architecture, st.num_classes, **st.arch_kwargs)
        except (TypeError, ValueError) as exc:
            raise AdaptationError("invalid_arch_kwargs", f"student: {exc}") from None
    student = student.to(device)
    data = open_image_set(base.data_path, base.data_format, preprocess_size=base.preprocess.size)
    eval_req = replace(base, num_classes=st.num_classes)
    eval_data = _open_eval(eval_req, data)
    prep = _Prep(base.preprocess, device, False, hooks)
    for model, s in zip(sources, req.sources):
        _check_input_shape(model, data, prep, s.num_classes)
    _check_input_shape(student, data, prep, st.num_classes)
    same = [s.num_classes == st.num_classes for s in req.sources]
    labelled = _labelled(req, prep, st.num_classes)
    if labelled is None and not all(same):
        raise AdaptationError("num_classes_mismatch", "sources whose class count differs from the student's "
                              "need a labelled target set (labelled_data) to be compared with the target task")

    def batches(order):
        return prep.iterate(data, base.batch_size, order)

    total = cfg.epochs * -(-len(data) // base.batch_size)
    hooks.progress(0, total, "scoring_sources")
    rows: list[dict] = []

    def on_step(row: dict) -> None:
        rows.append(row)
        if len(rows) % 10 == 0:
            publish = getattr(hooks, "steps", None)
            if publish is not None:
                publish(rows[-10:])
            hooks.progress(len(rows), total, "distilling")

    t0 = time.perf_counter()
    report = D.distill(sources, same, student, batches, len(data), labelled, st.num_classes, mode,
                       params.get("temperature", 1.0), cfg, device, on_step)
    seconds = time.perf_counter() - t0
    hooks.progress(len(rows), total, "recalibrating")
    recalibrated = 0
    if has_batch_norm(student):
        recalibrated = recalibrate_batch_norm(student, (x for x, _ in _take(batches(None), RECALIBRATION_BATCHES)))
    hooks.progress(len(rows), total, "evaluating")
    ctx = _Ctx()
    after_target = predict(student, data, prep, base.batch_size, ctx)
    selected = report["selected_source"]
    source_target = report["source_probs"][selected]
    entries = report["sources"]
    labels = None if eval_data is None else torch.from_numpy(eval_data.labels)
    source_eval = []
    for model, s, entry in zip(sources, req.sources, entries):
        if labels is not None and s.num_classes == st.num_classes:
            p = predict(model, eval_data, prep, base.batch_size, ctx)
            source_eval.append(p)
            entry["accuracy"] = M.accuracy(p, labels)
        else:
            source_eval.append(None)
            entry["accuracy"] = None

    hooks.progress(len(rows), total, "exporting")
    base.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = base.output_dir / "model.safetensors"
    save_safetensors(student, model_path, {"architecture": st.architecture, "num_classes": str(st.num_classes),
                                           "method": base.method})
    after_summary = M.prediction_summary(after_target, st.num_classes)
    metrics = {
        "method": base.method, "params": params,
        "sources": entries, "selected_source": selected, "similarity_metric": report["similarity_metric"],
        "pseudo_labels": report["pseudo_labels"],
        "entropy_before": M.mean_entropy(source_target) if source_target is not None else None,
        "entropy_after": after_summary["mean_entropy"],
        "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
        **E.accuracy_estimate(after_target),
        "images_per_second": len(rows) * base.batch_size / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device), "num_images": len(data), "device": str(device),
        "precision": precision, "num_labelled": 0 if labelled is None else len(labelled[1]),
        "target": {"after": after_summary}, "batchnorm_recalibration_batches": recalibrated,
        "model_load": {"sources": reports}, "timing": {"adapt_seconds": seconds, "steps": len(rows)},
        "collapse_detected": False,
    }
    if labels is not None:
        after_eval = predict(student, eval_data, prep, base.batch_size, ctx)
        after = M.labelled_summary(after_eval, labels, st.num_classes)
        metrics["accuracy_after"] = after["accuracy"]
        if source_eval[selected] is not None:
            before = M.labelled_summary(source_eval[selected], labels, st.num_classes)
            metrics["accuracy_before"] = before["accuracy"]
            metrics["eval"] = {"num_images": len(eval_data), "before": before, "after": after,
                               "class_names": eval_data.class_names}
        else:
            metrics["eval"] = {"num_images": len(eval_data), "after": after, "class_names": eval_data.class_names}
    return RunResult(metrics=metrics, history={"steps": rows, "collapse_events": []}, model_path=model_path)


class _Ctx:
    """What `predict` needs of a method context: fp32 on any device (students are small)."""

    @staticmethod
    def autocast():
        import contextlib

        return contextlib.nullcontext()


def run_auto(base: RunRequest, params: dict, hooks: Hooks | None = None) -> RunResult:
    """`params`: the validated `auto` params, dumped. Run each candidate method (its default params) through
    the runner (within `budget_s`: no candidate starts after it, the first always runs), pick one by
    `criterion` on the unlabelled target, export the pick."""
    hooks = hooks or NoHooks()
    candidates, criterion, budget_s = params["candidates"], params["criterion"], params["budget_s"]
    t0 = time.perf_counter()
    done: list[tuple[str, RunResult, torch.Tensor]] = []
    skipped = []
    for i, method in enumerate(candidates):
        if done and budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append(method)
            continue
        sub = replace(base, method=method, params={},
                      output_dir=base.output_dir / "candidates" / method)
        result = run(sub, _Prefixed(hooks, f"candidate {i + 1}/{len(candidates)} {method}: "))
        done.append((method, result, _target_probs(sub, result.model_path)))
    pick = E.choose([m for m, _, _ in done], [p for _, _, p in done], criterion)
    method, result, _ = done[pick["selected_index"]]
    for entry, (_, r, p) in zip(pick["candidates"], done):
        entry["accuracy_after"] = r.metrics.get("accuracy_after")
        entry["estimated_accuracy_after"] = E.accuracy_estimate(p)["estimated_accuracy_after"]
    metrics = dict(result.metrics)
    metrics.update(method="auto", params=params, selected_method=method, candidates=pick["candidates"],
                   criterion=criterion, skipped_candidates=skipped, selected_params=result.metrics.get("params"))
    base.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = base.output_dir / "model.safetensors"
    shutil.copyfile(result.model_path, model_path)
    return RunResult(metrics=metrics, history=result.history, model_path=model_path)


def execute(request: RunRequest | DistillRequest, hooks: Hooks | None = None) -> RunResult:
    """Any job: multi-source requests to `run_distill`, `auto` to `run_auto`, the rest to the runner."""
    from app.contract.catalog import get_method_info

    if isinstance(request, DistillRequest):
        base = request.base
        params = get_method_info(base.method).params_model.model_validate(base.params).model_dump()
        cfg = D.DistillConfig.from_params(params, epochs=base.epochs, seed=base.seed)
        return run_distill(request, params, cfg, hooks)
    if request.method == "auto":
        return run_auto(request, get_method_info("auto").params_model.model_validate(request.params).model_dump(),
                        hooks)
    return run(request, hooks)


class _Prefixed:
    def __init__(self, hooks: Hooks, prefix: str):
        self.hooks, self.prefix = hooks, prefix
        steps = getattr(hooks, "steps", None)
        if steps is not None:
            self.steps = steps

    def progress(self, done: int, total: int, phase: str) -> None:
        self.hooks.progress(done, total, self.prefix + phase)

    def should_cancel(self) -> bool:
        return self.hooks.should_cancel()


def _target_probs(req: RunRequest, model_path: Path) -> torch.Tensor:
    """The exported candidate's predictions on the target, in eval mode (what a user downloads)."""
    device = resolve_device(req.device)
    model, _ = load_model(req.architecture, req.num_classes, req.arch_kwargs, model_path, None)
    model = model.to(device)
    data = open_image_set(req.data_path, req.data_format, preprocess_size=req.preprocess.size)
    return predict(model, data, _Prep(req.preprocess, device, False, NoHooks()), req.batch_size, _Ctx())
