"""The method base class: named hooks (configure, trainable_params, build_optimizer, begin_epoch, step,
report, export_model), typed params from the catalogue, state the method declares (`state_attrs`, carried
by snapshot/restore), and the prediction for a batch too small to adapt on (`adapt`). The runner drives
it; a method never sees HTTP, the database or Celery."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from app.contract.catalog import MethodParams
from ..errors import AdaptationError
from .norm import has_batch_norm


@dataclass
class MethodContext:
    """What a method may know about the run."""

    num_classes: int
    device: torch.device
    batch_size: int
    epochs: int
    dataset_size: int
    seed: int = 0
    precision: str = "fp32"  # resolved: "fp32" or "bf16"
    # Iterates the whole target set once, in stored order: (preprocessed x on device, dataset indices).
    # SFDA methods use it at the start of each epoch (centroids, memory banks).
    iterate_target: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None
    # The preprocessing's per-channel normalisation (x = (pixel/255 - mean) / std), so augmentations can
    # work in pixel space [0, 1]; None when unknown (augmentations then rescale each image's own range).
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    task: str = "classification"  # the job's task (methods with a task-specific step branch on it)
    # The labelled source pool of methods that declare needs_source_data: (x preprocessed on device, labels).
    source_pool: tuple[torch.Tensor, torch.Tensor] | None = None
    # The local file of each param that names an upload (catalogue `upload_params`, e.g. prior_upload).
    files: dict[str, Path] = field(default_factory=dict)
    # The target images' names in stored order (data.names), to match a file's rows to images.
    image_names: list[str] | None = None

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class StepOutput:
    """What one adaptation step returns: the prediction for this batch (made by the model as it was
    when it saw the batch: the online protocol) and tensors to log (kept on the device; the runner
    syncs them in chunks, not once per step)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def make_optimizer(params: list[nn.Parameter] | list[dict], kind: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """Every optimizer a method or a student trains with: Adam (betas 0.9/0.999) or SGD; `params` may be
    parameter groups."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    raise ValueError(f"unknown optimizer {kind!r}")


def float_output(out: Any) -> Any:
    """A model's output in fp32: a tensor cast; anything else (a detector's list of per-image dicts) as it is."""
    return out.float() if isinstance(out, torch.Tensor) else out


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits), computed in fp32 for stability under autocast."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class Method:
    """Base of every method. Subclasses set `name` and implement `step` (and the hooks they need)."""

    name: ClassVar[str]
    # Methods that normalise with batch statistics cannot run on BatchNorm models at batch size 1.
    uses_batch_statistics: ClassVar[bool] = True
    # Attributes besides the model and the optimizer that snapshot/restore carry (reset_each, collapse
    # guard), collected over the class hierarchy: tensors are cloned, modules' state dicts copied, other
    # values (counters, None) kept as they are.
    state_attrs: ClassVar[tuple[str, ...]] = ()
    # Whether some forward passes run on batches whose size changes from step to step (a filtered
    # subset): cuDNN autotuning is then turned off, or it would re-tune at every step.
    dynamic_shapes: ClassVar[bool] = False
    # Whether the runner re-estimates the exported model's BatchNorm statistics on the target set after
    # adapting (a one-shot method keeps those of its own training batches: one target image is too few).
    recalibrate_on_target: ClassVar[bool] = True

    def __init__(self, model: nn.Module, params: MethodParams, ctx: MethodContext):
        self.model = model
        self.params = params
        self.ctx = ctx
        self.skipped_batches = 0  # batches too small to adapt on: predicted, not trained on
        self.check_compatible()
        self.configure()
        trainable = self.trainable_params()
        self.optimizer = self.build_optimizer(trainable) if trainable else None
        self.source_state = self.snapshot()

    # --- hooks -----------------------------------------------------------------------------------
    def check_compatible(self) -> None:
        if self.uses_batch_statistics and self.ctx.batch_size < 2 and has_batch_norm(self.model):
            raise AdaptationError(
                "batch_size_too_small",
                f"{self.name} normalises with batch statistics and the model has BatchNorm layers: "
                "batch_size must be at least 2 (16 or more recommended)",
                {"batch_size": self.ctx.batch_size},
            )

    def configure(self) -> None:
        """Set train/eval modes and requires_grad."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def trainable_params(self) -> list[nn.Parameter]:
        return []

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError(f"{self.name} has trainable parameters and must build its optimizer")

    def begin_epoch(self, epoch: int) -> None:
        """Called before each pass over the target data (SFDA methods recompute pseudo-labels here)."""

    def adapt(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        """What the runner calls for each batch: `step`, or, for a batch too small to adapt on, the
        prediction of the exported model without an update (the one place of that fallback)."""
        if self.too_small(x):
            self.skipped_batches += 1
            return self.predict_without_update(x)
        return self.step(x, index)

    def too_small(self, x: torch.Tensor) -> bool:
        """A batch of one image cannot be normalised with batch statistics (BatchNorm1d refuses it; the
        last batch of a dataset can be that small even when batch_size ≥ 2)."""
        return self.uses_batch_statistics and x.shape[0] < 2 and has_batch_norm(self.model)

    @torch.no_grad()
    def predict_without_update(self, x: torch.Tensor) -> StepOutput:
        """Predict with the exported model (the teacher of EMA-teacher methods) in eval mode, BatchNorm on
        its running statistics (which tracked the target while adapting); modes are restored after."""
        model = self.export_model()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with self.ctx.autocast():
                logits = float_output(model(x))
        finally:
            for m, t in modes.items():
                m.train(t)
        return StepOutput(logits)

    def step(self, x: torch.Tensor, index: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def history(self) -> dict[str, Any]:
        """Method-specific records for the job's history.json beside the per-step rows (e.g. per-image
        values), read once after adaptation."""
        return {}

    def report(self) -> dict[str, Any]:
        """Method-specific counters for the job's metrics (`metrics["method_report"]`), read once after
        adaptation (it may sync with the device)."""
        return {}

    def export_model(self) -> nn.Module:
        """The model whose weights the job returns (EMA-teacher methods return the teacher)."""
        return self.model

    # --- state: used by reset_each and the collapse guard -----------------------------------------
    @classmethod
    def declared_state(cls) -> tuple[str, ...]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names += [n for n in vars(klass).get("state_attrs", ()) if n not in names]
        return tuple(names)

    def snapshot(self) -> dict[str, Any]:
        state = {
            "model": _copy_state(self.model),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None,
        }
        for name in self.declared_state():
            state[name] = _copy_state(getattr(self, name))
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for name in self.declared_state():
            value = state[name]
            current = getattr(self, name)
            if isinstance(current, nn.Module):
                current.load_state_dict(value)
            else:
                setattr(self, name, value.clone() if isinstance(value, torch.Tensor) else value)

    def reset(self) -> None:
        self.restore(self.source_state)


def _copy_state(value: Any) -> Any:
    if isinstance(value, nn.Module):
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    return value.clone() if isinstance(value, torch.Tensor) else value
