"""Jobs over several models, built on the runner's pieces:
- `run_distill`: DistillNearest / DistillWeighted, several source models -> one student (`distill`);
- `run_auto`: several adaptation methods on one model, one picked without labels (`estimation.choose`).
Both return the runner's `RunResult`; the exported model is the student / the pick. `execute` sends any
job to the right one. Classification only (the task interface's other tasks are not wired here)."""
from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from app.checks.metadata import encode as model_metadata
from app.checks.preprocess import resolve as resolve_preprocess
from app.contract.catalog import get_method_info
from app.contract.jobs import JobSpec

from . import distill as D
from . import estimation as E
from .data import Preprocess, open_image_set
from .device import peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision, seed_everything
from .errors import AdaptationError
from .methods.norm import has_batch_norm
from .models import build_model
from .models.export import save_safetensors
from .models.loading import load_model
from .runner import (RECALIBRATION_BATCHES, Hooks, NoHooks, RunRequest, RunResult, _check_input_shape, _Prep, _take,
                     predict, run)
from .tasks import get_task

MAX_LABELLED = 10_000  # the labelled target set is held in memory, preprocessed


@dataclass(frozen=True)
class DistillRequest:
    """A multi-source job's validated spec (`models`, `student`) and where its inputs lie."""

    spec: JobSpec
    source_paths: list[Path]
    student_path: Path | None      # None: a freshly initialised student
    data_path: Path
    output_dir: Path
    eval_path: Path | None = None
    labelled_path: Path | None = None
    data_options: dict = field(default_factory=dict)  # dataset reader limits (the worker's max_pixels)

    @classmethod
    def for_files(cls, source_paths: list[Path], data_path: Path, output_dir: Path, eval_path: Path | None = None,
                  labelled_path: Path | None = None, **spec) -> "DistillRequest":
        """Local files instead of uploads (tests, benchmarks): `spec` holds JobSpec's fields, `models`
        without upload ids."""
        refs = {"models": [{**m, "upload_id": "local"} for m in spec.pop("models")], "data": {"upload_id": "local"}}
        if eval_path is not None:
            refs["eval_data"] = {"upload_id": "local-eval"}
        if labelled_path is not None:
            refs["labelled_data"] = {"upload_id": "local-labelled"}
        return cls(JobSpec.model_validate({**spec, **refs}), [Path(p) for p in source_paths], None, Path(data_path),
                   Path(output_dir), eval_path, labelled_path)


class _Fp32:
    """What `predict` needs of a method context: fp32 (students are small; sources are only read)."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _open_labelled(req: DistillRequest, path: Path | None, fmt: str | None, task, name: str,
                   limit: int | None = None):
    """A labelled set (labelled_data or eval_data), its labels checked against the student's classes."""
    if path is None:
        return None
    spec = req.spec
    ds = open_image_set(path, fmt, preprocess_size=spec.preprocess.size, **req.data_options)
    if ds.labels is None:
        raise AdaptationError(f"{name}_unlabelled", f"{name} must carry labels ('y' in npz, class folders in "
                              "archives)")
    if limit is not None and len(ds) > limit:
        raise AdaptationError("labelled_data_too_large", f"{name} holds {len(ds)} images; at most {limit} (it "
                              "is the few labelled target images)", {"limit": limit})
    task.check_labels(ds.labels, spec.student.num_classes)
    return ds


def run_distill(req: DistillRequest, hooks: Hooks | None = None) -> RunResult:
    hooks = hooks or NoHooks()
    spec, opts = req.spec, req.spec.options
    st = spec.student
    task = get_task(spec.task)
    params = get_method_info(spec.method).params_model.model_validate(spec.params).model_dump()
    cfg = D.DistillConfig.from_params(params, epochs=opts.epochs, seed=opts.seed)
    mode = "nearest" if spec.method == "distill_nearest" else "weighted"
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    reset_peak_memory(device)

    hooks.progress(0, 0, "loading")
    sources, reports = [], []
    for ref, path in zip(spec.models, req.source_paths):
        model, report = load_model(ref.architecture, ref.num_classes, ref.arch_kwargs, path, ref.format)
        sources.append(model.to(device).eval())
        reports.append(report)
    if req.student_path is not None:
        student, _ = load_model(st.architecture, st.num_classes, st.arch_kwargs, req.student_path, st.format)
    else:
        try:
            student = build_model(st.architecture, st.num_classes, **st.arch_kwargs)
        except (TypeError, ValueError) as exc:
            raise AdaptationError("invalid_arch_kwargs", f"student: {exc}") from None
    student = student.to(device)
    pre = spec.preprocess
    prep = _Prep(Preprocess(size=pre.size, channels=pre.channels, mean=pre.mean, std=pre.std), device, False, hooks)
    data = open_image_set(req.data_path, spec.data.format, preprocess_size=pre.size, **req.data_options)
    eval_data = _open_labelled(req, req.eval_path, spec.eval_data.format if spec.eval_data else None, task,
                               "eval_data")
    for model, ref in zip(sources, spec.models):
        _check_input_shape(model, data, prep, ref.num_classes, task)
    _check_input_shape(student, data, prep, st.num_classes, task)
    same = [ref.num_classes == st.num_classes for ref in spec.models]
    lab_set = _open_labelled(req, req.labelled_path, spec.labelled_data.format if spec.labelled_data else None,
                             task, "labelled_data", MAX_LABELLED)
    labelled = None
    if lab_set is not None:
        xs = torch.cat([x for x, _ in prep.iterate(lab_set, 256)])
        labelled = (xs, torch.from_numpy(lab_set.labels.astype(np.int64)).to(device))

    def batches(order):
        return prep.iterate(data, opts.batch_size, order)

    total = cfg.epochs * -(-len(data) // opts.batch_size)
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
        recalibrated = task.recalibrate(student, (x for x, _ in _take(batches(None), RECALIBRATION_BATCHES)), None)
    hooks.progress(len(rows), total, "evaluating")
    after_target = predict(student, data, prep, opts.batch_size, _Fp32(), task)
    selected = report["selected_source"]
    entries = report["sources"]
    source_eval = []
    for model, ref, entry in zip(sources, spec.models, entries):
        p = None
        if eval_data is not None and ref.num_classes == st.num_classes:
            p = predict(model, eval_data, prep, opts.batch_size, _Fp32(), task)
        source_eval.append(p)
        entry["accuracy"] = None if p is None else task.evaluate(p, eval_data.labels, st.num_classes)["accuracy"]

    hooks.progress(len(rows), total, "exporting")
    req.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = req.output_dir / "model.safetensors"
    # The runner's metadata: the student resubmits without flags (architecture, classes, kwargs, input).
    save_safetensors(student, model_path, model_metadata(
        architecture=st.architecture, num_classes=st.num_classes, arch_kwargs=st.arch_kwargs,
        preprocess=resolve_preprocess(pre.model_dump(exclude_unset=True), None, st.architecture), task=spec.task,
        method=spec.method))
    source_target = report["source_probs"][selected]
    after_summary = task.summary(after_target, st.num_classes)
    before_summary = None if source_target is None else task.summary(source_target, st.num_classes)
    entropy_before = None if before_summary is None else before_summary["mean_entropy"]
    metrics = {
        "method": spec.method, "params": params, "sources": entries, "selected_source": selected,
        "similarity_metric": report["similarity_metric"], "pseudo_labels": report["pseudo_labels"],
        "entropy_before": entropy_before,
        "entropy_after": after_summary["mean_entropy"],
        "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
        **E.accuracy_estimate(after_target),
        "images_per_second": len(rows) * opts.batch_size / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device), "num_images": len(data), "device": str(device),
        "precision": precision, "num_labelled": 0 if labelled is None else len(labelled[1]),
        # `before`: the selected source's, when its classes are the student's (as entropy_before)
        "target": {"after": after_summary, **({"before": before_summary} if before_summary is not None else {})},
        "batchnorm_recalibration_batches": recalibrated,
        "notes": [n for n in [E.entropy_note(entropy_before, after_summary["mean_entropy"], recalibrated,
                                                    distilled=True)] if n],
        "model_load": {"sources": reports}, "timing": {"adapt_seconds": seconds, "steps": len(rows)},
        "collapse_detected": False,
    }
    if eval_data is not None:
        after = task.evaluate(predict(student, eval_data, prep, opts.batch_size, _Fp32(), task), eval_data.labels,
                              st.num_classes)
        metrics["accuracy_after"] = after["accuracy"]
        ev = {"num_images": len(eval_data), "after": after, "class_names": eval_data.class_names}
        if source_eval[selected] is not None:
            ev["before"] = task.evaluate(source_eval[selected], eval_data.labels, st.num_classes)
            metrics["accuracy_before"] = ev["before"]["accuracy"]
        metrics["eval"] = ev
    return RunResult(metrics=metrics, history={"steps": rows, "collapse_events": []}, model_path=model_path)


def run_auto(req: RunRequest, hooks: Hooks | None = None) -> RunResult:
    """Run each candidate method (its default params) through the runner (within `budget_s`: no candidate
    starts after it, the first always runs), pick one by `criterion` on the unlabelled target, export the
    pick."""
    hooks = hooks or NoHooks()
    params = get_method_info("auto").params_model.model_validate(req.spec.params).model_dump()
    candidates, criterion, budget_s = params["candidates"], params["criterion"], params["budget_s"]
    t0 = time.perf_counter()
    done: list[tuple[str, RunResult, torch.Tensor]] = []
    skipped = []
    for i, method in enumerate(candidates):
        if done and budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append(method)
            continue
        sub = replace(req, spec=req.spec.model_copy(update={"method": method, "params": {}}),
                      output_dir=req.output_dir / "candidates" / method)
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
    req.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = req.output_dir / "model.safetensors"
    shutil.copyfile(result.model_path, model_path)
    return RunResult(metrics=metrics, history=result.history, model_path=model_path)


def execute(request: RunRequest | DistillRequest, hooks: Hooks | None = None) -> RunResult:
    """Any job: multi-source requests to `run_distill`, `auto` to `run_auto`, the rest to the runner."""
    if isinstance(request, DistillRequest):
        return run_distill(request, hooks)
    if get_method_info(request.spec.method).kind == "auto":
        return run_auto(request, hooks)
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
    spec = req.spec
    device = resolve_device(spec.options.device)
    model, _ = load_model(spec.model.architecture, spec.model.num_classes, spec.model.arch_kwargs, model_path, None)
    pre = spec.preprocess
    prep = _Prep(Preprocess(size=pre.size, channels=pre.channels, mean=pre.mean, std=pre.std), device, False,
                 NoHooks())
    data = open_image_set(req.data_path, spec.data.format, preprocess_size=pre.size, **req.data_options)
    return predict(model.to(device), data, prep, spec.options.batch_size, _Fp32(), get_task(spec.task))
