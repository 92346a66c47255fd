"""Spec -> adapted model + metrics. The one entry point of the engine: a plain Python call."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from . import examples as E
from . import metrics as M
from app.contract.catalog import get_method_info
from .collapse import CollapseGuard
from .data import ImageSet, Preprocess, open_image_set
from .device import (peak_memory_bytes, reset_peak_memory, resolve_device, resolve_precision,
                     seed_everything, synchronize)
from .errors import AdaptationError, JobCancelled
from .methods import get_method
from .methods.base import MethodContext
from .methods.norm import has_batch_norm
from .models.export import recalibrate_batch_norm, save_safetensors
from .models.loading import load_model

FLUSH_EVERY = 10            # batches between host syncs (history, guard, progress)
RECALIBRATION_BATCHES = 200  # at most this many target batches re-estimate BatchNorm statistics


@dataclass
class RunRequest:
    method: str
    model_path: Path
    architecture: str
    num_classes: int
    data_path: Path
    output_dir: Path
    params: dict = field(default_factory=dict)
    arch_kwargs: dict = field(default_factory=dict)
    model_format: str | None = None
    data_format: str | None = None
    eval_path: Path | None = None
    eval_format: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch_size: int = 128
    epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"


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
    info = get_method_info(req.method)
    params = info.params_model.model_validate(req.params)
    device = resolve_device(req.device)
    precision = resolve_precision(req.precision, device)
    seed_everything(req.seed)
    reset_peak_memory(device)

    hooks.progress(0, 0, "loading")
    model, load_report = load_model(req.architecture, req.num_classes, req.arch_kwargs, req.model_path,
                                    req.model_format)
    channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    data = open_image_set(req.data_path, req.data_format, preprocess_size=req.preprocess.size)
    eval_data = _open_eval(req, data)
    prep = _Prep(req.preprocess, device, channels_last, hooks)
    _check_input_shape(model, data, prep, req.num_classes)

    ctx = MethodContext(num_classes=req.num_classes, device=device, batch_size=req.batch_size,
                        epochs=req.epochs if info.kind == "sfda" else 1, dataset_size=len(data),
                        seed=req.seed, precision=precision,
                        iterate_target=lambda: prep.iterate(data, req.batch_size),
                        input_mean=tuple(req.preprocess.mean), input_std=tuple(req.preprocess.std))

    hooks.progress(0, 0, "evaluating_source")
    source_target = predict(model, data, prep, req.batch_size, ctx)
    source_eval = predict(model, eval_data, prep, req.batch_size, ctx) if eval_data is not None else None
    source_summary = M.prediction_summary(source_target, req.num_classes)

    method_cls = get_method(req.method)
    # cuDNN autotuning pays off for fixed batch shapes; a method whose batches change size every step
    # (ROID's kept subset) would re-tune at every step, so it runs on cuDNN's heuristics instead.
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not method_cls.dynamic_shapes
    method = method_cls(model, params, ctx)
    guard = CollapseGuard(req.num_classes, getattr(params, "collapse_entropy_ratio", 0.25),
                          source_summary["predicted_class_entropy"],
                          enabled=info.updates_weights and getattr(params, "collapse_guard", False))
    loop = _adapt(method, data, prep, req, ctx, guard, hooks, info.kind)

    hooks.progress(loop.done, loop.total, "recalibrating")
    method_report = method.report()
    adapted = method.export_model()
    recalibrated = 0
    if req.method != "source" and has_batch_norm(adapted):
        recalibrated = recalibrate_batch_norm(
            adapted, (x for x, _ in _take(prep.iterate(data, req.batch_size), RECALIBRATION_BATCHES)), ctx.autocast)

    hooks.progress(loop.done, loop.total, "evaluating")
    after_target = predict(adapted, data, prep, req.batch_size, ctx)
    after_summary = M.prediction_summary(after_target, req.num_classes)
    if guard.enabled and after_summary["predicted_class_entropy"] < guard.threshold:
        # The exported model itself collapsed: return the source weights and say so.
        method.reset()
        adapted = method.export_model()
        guard.events.append({"step": loop.done, "reason": "exported_model_collapsed",
                             "window_entropy": after_summary["predicted_class_entropy"],
                             "threshold": guard.threshold, "action": "returned_source_weights"})
        after_target = source_target
        after_summary = source_summary
    after_eval = predict(adapted, eval_data, prep, req.batch_size, ctx) if eval_data is not None else None

    hooks.progress(loop.done, loop.total, "exporting")
    req.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = req.output_dir / "model.safetensors"
    save_safetensors(adapted.to(memory_format=torch.contiguous_format), model_path,
                     {"architecture": req.architecture, "num_classes": str(req.num_classes),
                      "method": req.method})

    metrics = {
        "entropy_before": source_summary["mean_entropy"],
        "entropy_after": after_summary["mean_entropy"],
        "predicted_class_entropy_after": after_summary["predicted_class_entropy"],
        "agreement_with_source": M.agreement(after_target, source_target),
        "estimated_accuracy_after": M.average_confidence(after_target),
        "images_per_second": loop.images_per_second,
        "peak_memory_bytes": peak_memory_bytes(device),
        "collapse_detected": bool(guard.events),
        "method": req.method,
        "params": params.model_dump(),
        "num_images": len(data),
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "target": {"before": source_summary, "after": after_summary},
        "collapse": {"enabled": guard.enabled, "threshold": guard.threshold, "events": guard.events},
        "batchnorm_recalibration_batches": recalibrated,
        "estimator": "average_confidence",
        "model_load": load_report,
        "timing": {"adapt_seconds": loop.seconds, "steps": loop.done},
        "method_report": method_report,
    }
    if eval_data is not None:
        labels = torch.from_numpy(eval_data.labels)
        before = M.labelled_summary(source_eval, labels, req.num_classes)
        after = M.labelled_summary(after_eval, labels, req.num_classes)
        metrics.update(accuracy_before=before["accuracy"], accuracy_after=after["accuracy"],
                       eval={"num_images": len(eval_data), "before": before, "after": after,
                             "class_names": eval_data.class_names})
    if loop.online_predictions is not None and data.labels is not None:
        # Labels in `data` never reach the method; they only score the online predictions.
        seen = len(loop.online_predictions)
        metrics["online"] = {"accuracy": float((loop.online_predictions ==
                                                 torch.from_numpy(data.labels[:seen])).float().mean()),
                             "num_images": seen}
    history = {"steps": loop.history, "collapse_events": guard.events}
    shown = (eval_data, source_eval, after_eval) if eval_data is not None else (data, source_target, after_target)
    examples = E.pick(*shown, labelled=eval_data is not None)
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
def predict(model: nn.Module, data: ImageSet, prep: _Prep, batch_size: int, ctx: MethodContext) -> torch.Tensor:
    """Probabilities of `model` in eval mode over `data`, in stored order (float32, on the CPU)."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    out = []
    for x, _ in prep.iterate(data, batch_size):
        with ctx.autocast():
            out.append(model(x).float().softmax(1))
    for m, t in was_training.items():
        m.train(t)
    return torch.cat(out).cpu()


@dataclass
class _LoopResult:
    done: int
    total: int
    seconds: float
    images_per_second: float
    history: list[dict]
    online_predictions: torch.Tensor | None


def _adapt(method, data: ImageSet, prep: _Prep, req: RunRequest, ctx: MethodContext, guard: CollapseGuard,
           hooks: Hooks, kind: str) -> _LoopResult:
    n_batches = math.ceil(len(data) / req.batch_size)
    total = n_batches * ctx.epochs
    reset_each = getattr(method.params, "reset_each", 0)
    rng = np.random.default_rng(req.seed)
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
            row = {"step": step, "epoch": epoch,
                   "entropy": float(M.entropy(out.logits.softmax(1)).mean())}
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
        order = rng.permutation(len(data)) if kind == "sfda" else None
        for xb, idx in data.batches(req.batch_size, order):
            if hooks.should_cancel():
                raise JobCancelled()
            x = prep(xb)
            out = method.step(x, idx.to(ctx.device))
            preds = out.logits.argmax(1)
            if guard.enabled:
                guard.observe(preds)
            if epoch == ctx.epochs - 1 and kind != "sfda":
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


def _open_eval(req: RunRequest, data: ImageSet) -> ImageSet | None:
    if req.eval_path is None:
        return None
    eval_data = data if req.eval_path == req.data_path else open_image_set(req.eval_path, req.eval_format,
                                                                              preprocess_size=req.preprocess.size)
    if eval_data.labels is None:
        raise AdaptationError("eval_data_unlabelled", "eval_data must carry labels ('y' in npz, class folders "
                              "in archives)")
    if eval_data.labels.min() < 0 or eval_data.labels.max() >= req.num_classes:
        raise AdaptationError("label_out_of_range", f"eval_data labels must lie in 0..{req.num_classes - 1}",
                              {"min": int(eval_data.labels.min()), "max": int(eval_data.labels.max())})
    return eval_data


def _check_input_shape(model: nn.Module, data: ImageSet, prep: _Prep, num_classes: int) -> None:
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
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise AdaptationError("num_classes_mismatch", f"the model outputs {list(out.shape)}, expected (N, {num_classes})")
