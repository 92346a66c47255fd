"""Torch-free method catalogue: every method's name, kind, description, typed params, the tasks it
supports and what it updates.

The API validates job params and serves `GET /v1/methods` from it without torch; each engine
implementation (`worker/adaptation/methods/`) registers against its params class here
(`@implements(TentParams)`), so an entry and its implementation are bound by one object and a test
keeps the two sets equal. Defaults are the authors' and exist only here. Adding a method: a params
class + `@describe` in the module of its kind (`baselines`, `tta`, `sfda`, `segmentation`, `detection`, `multimodel`), and one implementation
file (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..tasks import Task


class MethodParams(BaseModel):
    """Base of every method's params: unknown keys are refused, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")


class ProtocolParams(MethodParams):
    """Protocol options shared by the test-time methods (explicit, never implied)."""

    reset_each: int = Field(
        0, ge=0,
        description="0 = continual (never reset). N > 0 = restore the source weights every N batches.",
    )


class CollapseGuard(MethodParams):
    """Collapse guard shared by every method that updates weights (test-time and source-free)."""

    collapse_guard: bool = Field(
        True, description="Roll back to the best state seen when the predicted-class histogram collapses "
        "or the loss diverges; recorded in the metrics.",
    )
    collapse_entropy_ratio: float = Field(
        0.25, gt=0, lt=1,
        description="Collapse when the entropy of the predicted-class histogram over a sliding window "
        "(segmentation: per class, the images whose mask holds it) falls below this fraction of ln(num_classes).",
    )


class CollapseGuardParams(CollapseGuard, ProtocolParams):
    """What every updating test-time method takes: the protocol options and the collapse guard."""


# The optimizer's fields, typed and bounded once; each params class gives its own default and description
# (the authors' values differ by method): `lr: LearningRate = Field(1e-3, description=...)`.
Optimizer = Literal["adam", "sgd"]
LearningRate = Annotated[float, Field(gt=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
WeightDecay = Annotated[float, Field(ge=0)]


# What a method may change in the network it adapts (its student); the method contract tests check it.
#   nothing              no parameter (BatchNorm running statistics may follow the target)
#   norm_affine          weight/bias of the BatchNorm/LayerNorm/GroupNorm layers, nothing else
#   norm_affine_but_last norm affine parameters outside the network's last stage (SAR)
#   all                  every weight
#   all_but_classifier   the feature extractor; the final nn.Linear stays frozen (SFDA)
UpdateScope = Literal["nothing", "norm_affine", "norm_affine_but_last", "all", "all_but_classifier"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: Literal["baseline", "tta", "sfda", "oneshot", "multisource", "auto"]
    description: str
    params_model: type[MethodParams]
    updates: UpdateScope
    tasks: tuple[Task, ...] = ("classification",)
    # Default schedule: passes over the target set a job makes when `options.epochs` is not given (the
    # authors' for SFDA methods; test-time methods always make one), plus forward-only passes over the
    # whole target set (pseudo-labels each epoch, memory banks once).
    epochs: int = 1
    forward_passes_per_epoch: int = 0
    forward_passes_once: int = 0
    # Defaults that differ by task, {task: {field: value}}: a field the job leaves out takes its task's value
    # here, else the params class's own default (written once, in one of the two places; the field's
    # description names both). `validate_params` applies them; `GET /v1/methods` shows them.
    task_defaults: dict = field(default_factory=dict)
    # A labelled source pool (the job's top-level `source_data`: images with masks/labels) the method trains
    # on; the API refuses the method without it and every other method with it.
    needs_source_data: bool = False

    @property
    def multi_epoch(self) -> bool:
        """Makes several passes over the target set (its `epochs`), in a shuffled order."""
        return self.kind in ("sfda", "oneshot")

    @property
    def updates_weights(self) -> bool:
        return self.updates != "nothing"

    def upload_params(self) -> list[tuple[str, str]]:
        """(param name, upload kind) of the params that name an upload: declared on the params class with
        `json_schema_extra={"upload_kind": kind}`; the API checks the upload, the worker fetches it."""
        return [(name, f.json_schema_extra["upload_kind"]) for name, f in self.params_model.model_fields.items()
                if isinstance(f.json_schema_extra, dict) and "upload_kind" in f.json_schema_extra]

    def params_schema(self) -> dict:
        return self.params_model.model_json_schema()

    def cost(self, epochs: int | None = None) -> dict:
        """Expected cost in passes over the target data, for `epochs` (default: the method's schedule).
        Every job adds its evaluation passes (source and adapted model) on top."""
        epochs = (epochs or self.epochs) if self.multi_epoch else 1
        extra = self.forward_passes_per_epoch * epochs + self.forward_passes_once
        return {"epochs": epochs, "forward_passes": epochs + extra,
                "backward_passes": epochs if self.updates_weights else 0}


CATALOG: dict[str, MethodInfo] = {}


def describe(name: str, kind: str, description: str, *, updates: UpdateScope,
             tasks: tuple[Task, ...] = ("classification",), epochs: int = 1, forward_passes_per_epoch: int = 0,
             forward_passes_once: int = 0, task_defaults: dict | None = None, needs_source_data: bool = False):
    """Class decorator on a params model: adds the method to the catalogue; duplicates fail loudly."""

    def wrap(params_model: type[MethodParams]) -> type[MethodParams]:
        if name in CATALOG:
            raise ValueError(f"method {name!r} is described twice")
        if any(info.params_model is params_model for info in CATALOG.values()):
            raise ValueError(f"{params_model.__name__} already describes another method")
        for task, values in (task_defaults or {}).items():
            unknown = set(values) - set(params_model.model_fields)
            if task not in tasks or unknown:
                raise ValueError(f"{name}: task_defaults for {task!r} name a task it lacks or unknown fields {unknown}")
        CATALOG[name] = MethodInfo(name, kind, description, params_model, updates, tasks, epochs,
                                   forward_passes_per_epoch, forward_passes_once, dict(task_defaults or {}),
                                   needs_source_data)
        return params_model

    return wrap


def info_for_params(params_model: type[MethodParams]) -> MethodInfo:
    """The entry a params class describes (implementations register against their params class)."""
    for info in CATALOG.values():
        if info.params_model is params_model:
            return info
    raise KeyError(f"{params_model.__name__} describes no method (decorate it with @describe)")


def validate_params(info: MethodInfo, params: dict, task: str) -> MethodParams:
    """A job's params for its task: the task's defaults (`task_defaults`) under what the job gives. The API
    stores the result complete, so the worker's re-validation finds every field given."""
    return info.params_model.model_validate({**info.task_defaults.get(task, {}), **params})


def get_method_info(name: str) -> MethodInfo:
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(CATALOG))}") from None


# Importing the per-kind modules runs their @describe decorators.
from . import baselines, detection, multimodel, segmentation, sfda, tta  # noqa: E402,F401


def catalogue_json() -> list[dict]:
    """The catalogue as `GET /v1/methods` serves it (and `adaptd methods` prints it without a server).
    needs_labels / needs_source_statistics: kept for existing clients (no method needs target labels or
    source statistics); needs_source_data: the method trains on a labelled source pool (`source_data`)."""
    return [{"name": m.name, "kind": m.kind, "description": m.description, "needs_labels": False,
             "needs_source_statistics": False, "needs_source_data": m.needs_source_data,
             "updates_weights": m.updates_weights, "tasks": list(m.tasks), "task_defaults": m.task_defaults,
             "cost": m.cost(), "params_schema": m.params_schema()} for m in CATALOG.values()]
