"""The job spec and the job as the API returns it: the contract between the API, which validates and
stores a spec, and the worker, which re-validates the stored spec with the same `JobSpec` and runs it."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

from .architectures import BUILTIN_ARCHITECTURES, is_resolvable_name
from .tasks import DEFAULT_TASK, Task

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")


class _Strict(BaseModel):
    # No NaN/Infinity anywhere; numbers are numbers (`"64"` and `true` are not a batch size).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


StrictCount = Annotated[int, Field(strict=True)]
MeanValue = Annotated[float, Field(ge=-1000.0, le=1000.0)]
StdValue = Annotated[float, Field(ge=1e-4, le=1000.0, description="at least 1e-4: a tiny std only "
                                  "amplifies noise into overflow")]


class _Architecture(_Strict):
    """A network to build: what a model to adapt, a source and a student have in common."""

    format: Literal["safetensors", "pt"] | None = None
    architecture: str | None = Field(None, min_length=1, max_length=200,
                                     description=f"built in: {', '.join(BUILTIN_ARCHITECTURES)}; or timm:<name>; "
                                     "or an operator-allow-listed module.path:factory. Omitted: taken from the "
                                     "checkpoint's adaptd metadata (a model adaptd exported)")
    num_classes: StrictCount | None = Field(None, ge=1, le=100_000, description="omitted: from the checkpoint's "
                                            "adaptd metadata")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str | None) -> str | None:
        if v is not None and not is_resolvable_name(v):
            raise ValueError(f"unknown architecture {v!r}; built in: {', '.join(BUILTIN_ARCHITECTURES)}")
        return v


class ModelRef(_Architecture):
    upload_id: str


class StudentRef(_Architecture):
    """The model a multi-source job trains and exports, optionally from initial weights."""

    upload_id: str | None = Field(None, description="initial weights; omitted: freshly initialised")


MAX_SOURCES = 8  # source models per multi-source job: each one's features on the target are held in memory


# What the worker reads (worker/adaptation/data/images.py READERS; a test holds the two equal). A
# WebDataset shard is a "tar"; "parquet" and "hf_dataset" (a zipped save_to_disk folder) are Hugging Face
# `datasets` exports.
DatasetFormat = Literal["npz", "zip", "tar", "parquet", "hf_dataset"]


class DataRef(_Strict):
    upload_id: str
    format: DatasetFormat | None = None


class PreprocessSpec(_Strict):
    """Each field omitted comes from the model's adaptd metadata, else the architecture's default input
    (app/checks/preprocess.py); the stored spec holds the resolved values."""

    size: StrictCount | None = Field(None, ge=4, le=4096, description="square resize; null keeps the input "
                                     "size; at most ADAPTD_MAX_PREPROCESS_SIZE")
    channels: Literal[1, 3] | None = None

    @field_validator("channels", mode="before")
    @classmethod
    def _no_bool(cls, v):  # True == 1 in Python: a JSON boolean is not a channel count
        if isinstance(v, bool):
            raise ValueError("channels must be 1 or 3, not a boolean")
        return v
    mean: list[MeanValue] | None = Field(None, max_length=3, description="per channel (or one value)")
    std: list[StdValue] | None = Field(None, max_length=3, description="per channel (or one value)")

    @model_validator(mode="after")
    def _lengths(self) -> "PreprocessSpec":
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (not value or (self.channels and len(value) not in (1, self.channels))):
                raise ValueError(f"{name} must have 1 or {self.channels or 'channels'} values (one per channel)")
        return self


class Options(_Strict):
    batch_size: StrictCount = Field(128, ge=1, le=8192)
    epochs: StrictCount | None = Field(None, ge=1, le=1000, description="passes over the target data (SFDA "
                                       "methods); default: the method's own schedule (`cost.epochs` in "
                                       "GET /v1/methods)")
    seed: StrictCount = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the adapted model (single-model jobs): `auto` compiles on CUDA when the job has enough "
        "steps to repay the compilation (and the method's batch shapes are fixed); a compilation that fails "
        "falls back to eager, and `metrics.compile` says what happened")


TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:=+/-]{0,63}$"


class JobSpec(_Strict):
    name: str | None = Field(None, min_length=1, max_length=200,
                             description="a label to find the run again (GET /v1/jobs?name=)")
    tags: list[str] = Field(default_factory=list, max_length=32,
                            description="labels to find the run again (GET /v1/jobs?tag=, all must match)")
    task: Task = Field(DEFAULT_TASK, description="what the model predicts; the architecture and the method "
                       "must support it")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    # `models` is declared before `model` so that `model`'s validator sees it.
    models: list[ModelRef] | None = Field(None, min_length=1, max_length=MAX_SOURCES,
                                          description="source models of a multi-source method (distill_*), in "
                                          "the order the metrics report them")
    student: StudentRef | None = Field(None, description="the model a multi-source method trains and exports")
    model: ModelRef | None = Field(None, validate_default=True,
                                   description="the model to adapt (every method but the multi-source ones)")
    data: DataRef
    eval_data: DataRef | None = None
    labelled_data: DataRef | None = Field(None, description="a few labelled target images (multi-source "
                                          "methods): similarity pseudo-labels and a supervised loss")
    source_data: DataRef | None = Field(None, description="a labelled source pool (images with their masks), "
                                        "for the methods that train on one (catalogue: needs_source_data; "
                                        "idm); refused with any other method")
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    options: Options = Field(default_factory=Options)
    notify_url: HttpUrl | None = Field(None, description="POSTed the job's final state (signed, "
                                       "X-Adaptd-Signature) when it succeeds, fails or is cancelled")

    @field_validator("model")
    @classmethod
    def _model_or_sources(cls, v: ModelRef | None, info) -> ModelRef | None:
        has_sources = info.data.get("models") is not None
        if v is None and not has_sources:
            raise ValueError("Field required (`model`, or `models` for a multi-source method)")
        if v is not None and has_sources:
            raise ValueError("give either `model` (one model to adapt) or `models` (the sources of a "
                             "multi-source method), not both")
        return v

    @model_validator(mode="after")
    def _sources_and_student(self) -> "JobSpec":
        if (self.models is None) != (self.student is None):
            raise ValueError("`models` and `student` go together (multi-source methods)")
        if self.labelled_data is not None and self.models is None:
            raise ValueError("`labelled_data` is for multi-source methods (with `models`)")
        if self.models is not None and self.labelled_data is None:
            # Without labelled target images, a source's similarity uses its own predictions as
            # pseudo-labels and its logits are distilled: its classes must be the student's. (A count left
            # out is taken from the checkpoint's metadata at submit, and the completed spec checked again.)
            for i, m in enumerate(self.models):
                if None not in (m.num_classes, self.student.num_classes) and m.num_classes != self.student.num_classes:
                    raise ValueError(f"models[{i}].num_classes is {m.num_classes}, the student's is "
                                     f"{self.student.num_classes}: sources with other classes need "
                                     "`labelled_data`")
        return self

    def architectures(self) -> list[tuple[str, "_Architecture"]]:
        """(field path, reference) of every network the spec names: the model, or the sources and student."""
        out: list[tuple[str, _Architecture]] = [("model", self.model)] if self.model is not None else []
        out += [(f"models[{i}]", m) for i, m in enumerate(self.models or [])]
        return out + ([("student", self.student)] if self.student is not None else [])

    def model_refs(self) -> list[tuple[str, str]]:
        """(field path, upload id) of every model upload the spec names."""
        refs = [("model", self.model.upload_id)] if self.model is not None else []
        refs += [(f"models[{i}]", m.upload_id) for i, m in enumerate(self.models or [])]
        if self.student is not None and self.student.upload_id is not None:
            refs.append(("student", self.student.upload_id))
        return refs

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not re.match(TAG_PATTERN, tag):
                raise ValueError(f"tag {tag!r}: 1-64 characters, letters, digits and _ . : = + / -, "
                                 "starting with a letter or digit")
        return list(dict.fromkeys(v))  # duplicates dropped, order kept


class Progress(BaseModel):
    done: int
    total: int
    fraction: float
    phase: str | None


class JobError(BaseModel):
    code: str
    message: str
    detail: dict = Field(default_factory=dict)
    correlation_id: str | None = Field(None, description="quote it to the operator: the worker's log "
                                       "holds the details under this id")


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str


class JobSummary(BaseModel):
    """A row of `GET /v1/jobs`: the job without its spec, params and artifacts, and only the scalar
    metrics (the nested reports stay in `GET /v1/jobs/{id}`). `?view=full` lists JobOut rows."""
    id: str
    name: str | None = None
    tags: list[str] = Field(default_factory=list)
    status: JobStatus
    method: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: dict | None
    error: JobError | None


class JobOut(JobSummary):
    params: dict
    spec: dict
    artifacts: list[ArtifactOut]
    waiting_reason: str | None = Field(None, description="a queued job: why no worker runs it now (no live "
                                       "worker, or none that can run jobs); null otherwise")


class JobList(BaseModel):
    items: list[JobOut | JobSummary]
    next_cursor: str | None


class LogLineOut(BaseModel):
    seq: int = Field(description="increasing; pass the last one seen as `after`")
    at: datetime
    level: str
    message: str


class JobLogPage(BaseModel):
    job_id: str
    status: JobStatus = Field(
        description="read before the lines: once it is final, the job's last lines are in this page or "
        "an earlier one")
    items: list[LogLineOut]
    next_after: int
    more: bool = Field(description="more lines are stored after these: ask again at once")
