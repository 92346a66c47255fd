"""The job spec and the job as the API returns it: the contract between the API, which validates and
stores a spec, and the worker, which re-validates the stored spec with the same `JobSpec` and runs it."""
from __future__ import annotations

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


class ModelRef(_Strict):
    upload_id: str
    format: Literal["safetensors", "pt"] | None = None
    architecture: str = Field(..., min_length=1, max_length=200,
                              description=f"built in: {', '.join(BUILTIN_ARCHITECTURES)}; or timm:<name>; "
                              "or an operator-allow-listed module.path:factory")
    num_classes: StrictCount = Field(..., ge=1, le=100_000)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str) -> str:
        if not is_resolvable_name(v):
            raise ValueError(f"unknown architecture {v!r}; built in: {', '.join(BUILTIN_ARCHITECTURES)}")
        return v


# What the worker reads (worker/adaptation/data/images.py READERS; a test holds the two equal). A
# WebDataset shard is a "tar"; "parquet" and "hf_dataset" (a zipped save_to_disk folder) are Hugging Face
# `datasets` exports.
DatasetFormat = Literal["npz", "zip", "tar", "parquet", "hf_dataset"]


class DataRef(_Strict):
    upload_id: str
    format: DatasetFormat | None = None


class PreprocessSpec(_Strict):
    size: StrictCount | None = Field(None, ge=4, le=4096, description="square resize; omitted keeps the "
                                     "input size; at most ADAPTD_MAX_PREPROCESS_SIZE")
    channels: Literal[1, 3] = 3

    @field_validator("channels", mode="before")
    @classmethod
    def _no_bool(cls, v):  # True == 1 in Python: a JSON boolean is not a channel count
        if isinstance(v, bool):
            raise ValueError("channels must be 1 or 3, not a boolean")
        return v
    mean: list[MeanValue] | None = Field(None, max_length=3, description="per channel (or one value); default 0")
    std: list[StdValue] | None = Field(None, max_length=3, description="per channel (or one value); default 1")

    @model_validator(mode="after")
    def _lengths(self) -> "PreprocessSpec":
        self.mean = self.mean if self.mean is not None else [0.0] * self.channels
        self.std = self.std if self.std is not None else [1.0] * self.channels
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                raise ValueError(f"{name} must have 1 or {self.channels} values (one per channel)")
        return self


class Options(_Strict):
    batch_size: StrictCount = Field(128, ge=1, le=8192)
    epochs: StrictCount = Field(1, ge=1, le=1000, description="passes over the target data (SFDA methods)")
    seed: StrictCount = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class JobSpec(_Strict):
    task: Task = Field(DEFAULT_TASK, description="what the model predicts; the architecture and the method "
                       "must support it")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    model: ModelRef
    data: DataRef
    eval_data: DataRef | None = None
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    options: Options = Field(default_factory=Options)
    notify_url: HttpUrl | None = Field(None, description="POSTed the job's final state (signed, "
                                       "X-Adaptd-Signature) when it succeeds, fails or is cancelled")


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


class JobOut(BaseModel):
    id: str
    status: JobStatus
    method: str
    params: dict
    spec: dict
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: dict | None
    error: JobError | None
    artifacts: list[ArtifactOut]


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
