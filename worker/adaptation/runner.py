"""Spec -> adapted model + metrics. The one entry point of the engine: a plain Python call.

The request carries the job's `JobSpec` (app/contract, the model the API validated, re-validated here)
and where its inputs lie; every default comes from the contract. What depends on the task (prediction,
input check, scoring, recalibration, collapse signal) goes through `tasks.get_task(spec.task)`."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from app.checks.metadata import encode as model_metadata
from app.checks.preprocess import resolve as resolve_preprocess
from app.contract.catalog import CollapseGuard as GuardParams
from app.contract.catalog import ProtocolParams, get_method_info, validate_params
from app.contract.jobs import JobSpec

from . import estimation as E
from .collapse import CollapseGuard
from .data import ImageSet, Preprocess, open_image_set
from .compiling import Compiling
from .device import (peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision,
                     seed_everything, synchronize)
from .errors import AdaptationError, JobCancelled
from .methods import get_method
from .methods.base import MethodContext
from .methods.norm import has_batch_norm
from .models.export import save_safetensors
from .models.loading import load_model
from .tasks import TaskEngine, get_task

FLUSH_EVERY = 10            # batches between host syncs (history, guard, progress)
RECALIBRATION_BATCHES = 200  # at most this many target batches re-estimate BatchNorm statistics


@dataclass(frozen=True)
class RunRequest:
    """A validated job spec and where its inputs lie on this machine."""

    spec: JobSpec
    model_path: Path
    data_path: Path
    output_dir: Path
    eval_path: Path | None = None
    data_options: dict = field(default_factory=dict)  # dataset reader limits (the worker's max_pixels)
    source_path: Path | None = None  # the labelled source pool (`source_data`) of methods that need one
    param_files: dict[str, Path] = field(default_factory=dict)  # a method param naming an upload -> its file

    @classmethod
    def for_files(cls, model_path: Path, data_path: Path, output_dir: Path, eval_path: Path | None = None,
                  source_path: Path | None = None, **spec) -> "RunRequest":
        """Local files instead of uploads (tests, benchmarks): `spec` holds JobSpec's fields, its
        `model` without an upload id."""
        refs = {"model": {**spec.pop("model"), "upload_id": "local"}, "data": {"upload_id": "local"}}
        if eval_path is not None:
            refs["eval_data"] = {"upload_id": "local-eval"}
        if source_path is not None:
            refs["source_data"] = {"upload_id": "local-source"}
        return cls(JobSpec.model_validate({**spec, **refs}), Path(model_path), Path(data_path), Path(output_dir),
                   Path(eval_path) if eval_path is not None else None,
                   source_path=Path(source_path) if source_path is not None else None)


@dataclass
class RunResult:
    metrics: dict
    history: dict
    model_path: Path
    examples: dict | None = None  # a few thumbnails with predictions before/after (examples.py)


class Hooks(Protocol):
    def progress(self, done: int, total: int, phase: str) -> None: ...
    def should_cancel(self) -> bool: ...
    # Optional: `steps(rows: list[dict])` receives the new per-step history rows at each flush.


class NoHooks:
    def progress(self, done: int, total: int, phase: str) -> None:
        pass

    def should_cancel(self) -> bool:
        return False


def run(req: RunRequest, hooks: Hooks | None = None) -> RunResult:
    hooks = hooks or NoHooks()
    spec, opts = req.spec, req.spec.options
    num_classes = spec.model.num_classes
    info = get_method_info(spec.method)
    task = get_task(spec.task)
    params = validate_params(info, spec.params, spec.task)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    seed_everything(opts.seed)
    reset_peak_memory(device)

    # The data first (indexes only): from the first phase on, progress shows how many batches will run.
    # Fields the spec leaves out: the architecture's default input (the API stores them resolved already).
    pre = resolve_preprocess(spec.preprocess.model_dump(exclude_unset=True), None, spec.model.architecture)
    task.check_preprocess(pre)
    data = open_image_set(req.data_path, spec.data.format, preprocess_size=pre["size"], masks=task.masks,
                          pad_mixed_sizes=task.pad_mixed_sizes, **req.data_options)
    eval_data = _open_eval(req, data, task, pre["size"])
    source_data = _open_source(req, info, task, pre["size"])
    epochs = info.cost(opts.epochs)["epochs"]  # SFDA: the job's epochs, else the method's schedule
    total = math.ceil(len(data) / opts.batch_size) * epochs
    hooks.progress(0, total, "loading")
    model, load_report = load_model(spec.model.architecture, num_classes, spec.model.arch_kwargs, req.model_path,
                                    spec.model.format)
    channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    prep = _Prep(Preprocess(**pre), device, channels_last, hooks)
    _check_input_shape(model, data, prep, num_classes, task)

    ctx = MethodContext(num_classes=num_classes, device=device, batch_size=opts.batch_size,
                        epochs=epochs, dataset_size=len(data),
                        seed=opts.seed, precision=precision,
                        iterate_target=lambda: prep.iterate(data, opts.batch_size),
                        input_mean=tuple(pre["mean"]), input_std=tuple(pre["std"]), files=req.param_files,
                        image_names=data.names, task=spec.task,
                        source_pool=_source_pool(source_data, prep) if source_data is not None else None)

    hooks.progress(0, total, "evaluating_source")
    source_target = predict(model, data, prep, opts.batch_size, ctx, task)
    source_eval = predict(model, eval_data, prep, opts.batch_size, ctx, task) if eval_data is not None else None
    source_summary = task.summary(source_target, num_classes)

    method_cls = get_method(spec.method)
    # cuDNN autotuning pays off for fixed batch shapes; a method whose batches change size every step
    # (ROID's kept subset) would re-tune at every step, so it runs on cuDNN's heuristics instead.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not method_cls.dynamic_shapes
    method = method_cls(model, params, ctx)
    # Only methods whose params take the collapse guard have one; the ratio's default is declared once,
    # on those params (the threshold is reported either way).
    guarded = isinstance(params, GuardParams)
    ratio = params.collapse_entropy_ratio if guarded else GuardParams.model_fields["collapse_entropy_ratio"].default
    guard = CollapseGuard(task.signal_classes(num_classes), ratio, task.collapse_score(source_summary),
                          enabled=info.updates_weights and guarded and params.collapse_guard)
    reset_each = params.reset_each if isinstance(params, ProtocolParams) else 0  # 0: never reset
    compiling = Compiling(opts.compile, device, method_cls.dynamic_shapes, total, opts.batch_size)
    compiling.apply(method.model)
    loop = _adapt(method, data, prep, opts.batch_size, opts.seed, reset_each, ctx, guard, hooks, info.multi_epoch,
                  task, compiling)
    compiling.uncompile()

    hooks.progress(loop.done, loop.total, "recalibrating")
    method_report = method.report()
    adapted = method.export_model()
    recalibrated = 0
    # `source` returns the model as uploaded; a one-shot method keeps the statistics of its training batches
    if info.kind != "baseline" and method.recalibrate_on_target and has_batch_norm(adapted):
        recalibrated = task.recalibrate(
            adapted, (x for x, _ in _take(prep.iterate(data, opts.batch_size), RECALIBRATION_BATCHES)), ctx.autocast)

    hooks.progress(loop.done, loop.total, "evaluating")
    after_target = predict(adapted, data, prep, opts.batch_size, ctx, task)
    after_summary = task.summary(after_target, num_classes)
    if guard.enabled and task.collapse_score(after_summary) < guard.threshold:
        # The exported model itself collapsed: return the source weights and say so.
        method.reset()
        adapted = method.export_model()
        guard.events.append({"step": loop.done, "reason": "exported_model_collapsed",
                             "window_entropy": task.collapse_score(after_summary),
                             "threshold": guard.threshold, "action": "returned_source_weights"})
        after_target = source_target
        after_summary = source_summary
    after_eval = predict(adapted, eval_data, prep, opts.batch_size, ctx, task) if eval_data is not None else None

    hooks.progress(loop.done, loop.total, "exporting")
    req.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = req.output_dir / "model.safetensors"
    # Everything a resubmission needs, so the exported model runs again without flags.
    save_safetensors(adapted.to(memory_format=torch.contiguous_format), model_path, model_metadata(
        architecture=spec.model.architecture, num_classes=num_classes, arch_kwargs=spec.model.arch_kwargs,
        preprocess=pre, task=spec.task, method=spec.method))

    metrics = {
        **task.headline(source_target, after_target, source_summary, after_summary),
        "images_per_second": loop.images_per_second,
        "peak_memory_bytes": peak_memory_bytes(device),
        "collapse_detected": bool(guard.events),
        "method": spec.method,
        "params": params.model_dump(),
        "num_images": len(data),
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "target": {"before": source_summary, "after": after_summary},
        "collapse": {"enabled": guard.enabled, "threshold": guard.threshold, "events": guard.events},
        "batchnorm_recalibration_batches": recalibrated,
        "notes": [n for n in [E.entropy_note(source_summary.get("mean_entropy"), after_summary.get("mean_entropy"),
                                             recalibrated)] if n],
        "model_load": load_report,
        "timing": {"adapt_seconds": loop.seconds, "steps": loop.done, "epochs": ctx.epochs},
        "compile": compiling.report(),
        "method_report": method_report,
    }
    if eval_data is not None:
        before = task.evaluate(source_eval, eval_data.labels, num_classes)
        after = task.evaluate(after_eval, eval_data.labels, num_classes)
        metrics.update(**task.eval_headline(before, after),
                       eval={"num_images": len(eval_data), "before": before, "after": after,
                             "class_names": eval_data.class_names})
        mapping = getattr(eval_data, "category_mapping", None)  # COCO categories -> label ids (archives/coco.py)
        if mapping is not None:
            metrics["eval"]["category_mapping"] = mapping
    if loop.online_predictions is not None and data.labels is not None:
        # Labels in `data` never reach the method; they only score the online predictions.
        metrics["online"] = task.online(loop.online_predictions, data.labels)
    history = {"steps": loop.history, "collapse_events": guard.events, **method.history()}
    shown = (eval_data, source_eval, after_eval) if eval_data is not None else (data, source_target, after_target)
    examples = task.examples(*shown, labelled=eval_data is not None)
    return RunResult(metrics=metrics, history=history, model_path=model_path, examples=examples)


# --- internals -----------------------------------------------------------------------------------

class _Prep:
    """Preprocessing bound to the run's device; every pass over a data set goes through `iterate`,
    which also honours cancellation between batches (evaluation passes included)."""

    def __init__(self, spec: Preprocess, device: torch.device, channels_last: bool, hooks: Hooks):
        self.spec, self.device, self.channels_last, self.hooks = spec, device, channels_last, hooks

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        try:
            return self.spec(xb, self.device, self.channels_last)
        except ValueError as exc:
            raise AdaptationError("invalid_preprocess", str(exc)) from None

    def iterate(self, data: ImageSet, batch_size: int, order: np.ndarray | None = None):
        for xb, idx in data.batches(batch_size, order):
            if self.hooks.should_cancel():
                raise JobCancelled()
            yield self(xb), idx.to(self.device)


def _take(it, n: int):
    for i, item in enumerate(it):
        if i >= n:
            return
        yield item


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, prep: _Prep, batch_size: int, ctx: MethodContext,
            task: TaskEngine) -> torch.Tensor | dict[str, torch.Tensor] | list:
    """The task's predictions of `model` in eval mode over `data`, in stored order, on the CPU."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    out = []
    for x, _ in prep.iterate(data, batch_size):
        with ctx.autocast():
            out.append(task.prediction(model(x)))
    for m, t in was_training.items():
        m.train(t)
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]).cpu() for k in out[0]}
    if isinstance(out[0], list):  # one item per image (detections: variable length)
        return [item for o in out for item in o]
    return torch.cat(out).cpu()


@dataclass
class _LoopResult:
    done: int
    total: int
    seconds: float
    images_per_second: float
    history: list[dict]
    online_predictions: torch.Tensor | None


def _adapt(method, data: ImageSet, prep: _Prep, batch_size: int, seed: int, reset_each: int, ctx: MethodContext,
           guard: CollapseGuard, hooks: Hooks, multi_epoch: bool, task: TaskEngine,
           compiling: Compiling) -> _LoopResult:
    n_batches = math.ceil(len(data) / batch_size)
    total = n_batches * ctx.epochs
    rng = np.random.default_rng(seed)
    history: list[dict] = []
    pending: list[tuple[int, int, object]] = []
    online: list[torch.Tensor] = []
    done = images = 0
    stopped = False
    hooks.progress(0, total, "adapting")
    synchronize(ctx.device)
    t0 = time.perf_counter()
    guard.healthy_state = method.snapshot() if guard.enabled else None

    def flush() -> bool:
        """Sync logged tensors to the host, run the guard; returns False to stop adapting."""
        losses = []
        first_new = len(history)
        for step, epoch, out in pending:
            row = {"step": step, "epoch": epoch, "entropy": float(task.step_entropy(out.logits))}
            if out.loss is not None:
                row["loss"] = float(out.loss)
                losses.append(row["loss"])
            row.update({k: float(v) for k, v in out.logs.items()})
            history.append(row)
        pending.clear()
        publish_steps = getattr(hooks, "steps", None)  # optional hook: live per-step curves
        if publish_steps is not None and len(history) > first_new:
            publish_steps(history[first_new:])
        reason = guard.check(losses)
        if reason:
            guard.record(done, reason)
            method.restore(guard.healthy_state)
            if guard.exhausted:
                return False
        elif guard.enabled:
            guard.healthy_state = method.snapshot()
        hooks.progress(done, total, "adapting")
        return True

    for epoch in range(ctx.epochs):
        method.begin_epoch(epoch)
        order = rng.permutation(len(data)) if multi_epoch else None
        for xb, idx in data.batches(batch_size, order):
            if hooks.should_cancel():
                raise JobCancelled()
            x = prep(xb)
            out = compiling.adapt(method, x, idx.to(ctx.device))
            preds = task.collapse_signal(out.logits, ctx.num_classes)
            if guard.enabled:
                guard.observe(task.collapse_counts(preds, len(out.logits), guard.num_classes))
            if epoch == ctx.epochs - 1 and not multi_epoch:
                online.append(preds)
            pending.append((done, epoch, out))
            done += 1
            images += x.shape[0]
            if reset_each and done % reset_each == 0:
                method.reset()
            if len(pending) >= FLUSH_EVERY and not flush():
                stopped = True
                break
        if stopped:
            break
    if pending and not flush():
        stopped = True
    synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    if stopped:
        guard.events[-1]["action"] = "rolled_back_and_stopped"
    return _LoopResult(done, total, seconds, images / seconds if seconds > 0 else 0.0, history,
                       torch.cat(online).cpu() if online else None)


def _open_eval(req: RunRequest, data: ImageSet, task: TaskEngine, size: int | None) -> ImageSet | None:
    if req.eval_path is None:
        return None
    spec = req.spec
    eval_data = data if req.eval_path == req.data_path else open_image_set(
        req.eval_path, spec.eval_data.format if spec.eval_data else None, preprocess_size=size,
        masks=task.masks, pad_mixed_sizes=task.pad_mixed_sizes, **req.data_options)
    if eval_data.labels is None:
        raise AdaptationError("eval_data_unlabelled", "eval_data must carry labels ('y' in npz; class folders, "
                              "or masks/NAME.png beside images/NAME.ext for segmentation, in archives)")
    task.check_labels(eval_data.labels, spec.model.num_classes)
    return eval_data


def _open_source(req: RunRequest, info, task: TaskEngine, size: int | None) -> ImageSet | None:
    """The labelled source pool of a method that trains on one (the API refuses the spec otherwise)."""
    if not info.needs_source_data:
        return None
    if req.source_path is None:
        raise AdaptationError("source_data_missing", f"{info.name} trains on a labelled source pool: the job "
                              "needs `source_data` (images with masks)")
    pool = open_image_set(req.source_path, req.spec.source_data.format if req.spec.source_data else None,
                          preprocess_size=size, masks=task.masks, pad_mixed_sizes=task.pad_mixed_sizes,
                          **req.data_options)
    if pool.labels is None:
        raise AdaptationError("source_data_unlabelled", "source_data must carry its masks ('y' in npz, "
                              "masks/NAME.png beside images/NAME.ext in archives)")
    task.check_labels(pool.labels, req.spec.model.num_classes)
    return pool


def _source_pool(pool: ImageSet, prep: _Prep) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole source pool preprocessed on the run's device, with its labels: (x, y). Held in memory (a
    one-shot method samples from it at random every step)."""
    xs = [x for x, _ in prep.iterate(pool, 256)]
    return torch.cat(xs), torch.from_numpy(np.asarray(pool.labels).astype(np.int64)).to(prep.device)


def _check_input_shape(model: nn.Module, data: ImageSet, prep: _Prep, num_classes: int, task: TaskEngine) -> None:
    """One forward pass on two images so a size/channel mismatch fails now, with a clear message."""
    xb, _ = next(iter(data.batches(2)))
    x = prep(xb)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise AdaptationError("input_shape_mismatch", f"the model cannot run on the preprocessed input "
                              f"{list(x.shape)}: {str(exc).splitlines()[0][:300]}",
                              {"input_shape": list(x.shape)}) from None
    finally:
        model.train(was)
    task.check_output(out, num_classes)
